"""`finers-rt serve --ray`: the pipeline on Ray Serve, one deployment per model stage, behind the
same HTTP API as `finers-rt serve` (POST /v1/segment, GET /healthz, GET /metrics).

Deployments (Ray Serve names; a Serve config file can override their replicas and resources by name):
  GSE, LPR  `GeneratorReplica`: one ort `OrtGenerator` for ENGINES/gse or ENGINES/lpr.
  SAM2      `SAM2Replica`: one ort `OrtSAM2` for ENGINES/sam2; set_image + predict in one call.
  Ingress   `Ingress`: `serve.create_app` (validation, queue, 429/504, warm-up, healthz, metrics)
            around a `RayPipeline`, which is `Pipeline.run` itself with its model calls made remote.
Host work (image decode, the stage resizes, crop, parsing, mask paste, RLE) stays on the ingress, so a
stage replica receives stage-sized arrays only: GSE (1080, 1920, 3) uint8 (6 MB), LPR (512, 512, 3),
SAM2 the crop. Ray is imported inside functions only: nothing else in finers-rt imports it.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .config import PipelineConfig
from .host_parallel import HOST_THREADS
from .pipeline import Pipeline
from .segment import best_mask, prompt_arrays

log = logging.getLogger(__name__)

APP_NAME = "finers"
STAGES = ("gse", "lpr", "sam2")
DEVICES = ("cpu", "cuda", "tensorrt")  # backends.ort.PROVIDERS
INGRESS_HEADROOM = 16  # HTTP requests an ingress replica takes beyond workers + queue: healthz, metrics, refusals
# KEY=VALUE keys of --ray-gse/--ray-lpr/--ray-sam2 and of --ray-ingress, with their types.
STAGE_KEYS = {"replicas": int, "num_cpus": float, "num_gpus": float, "device": str}
INGRESS_KEYS = {"replicas": int, "num_cpus": float, "workers": int}
_KINDS = {int: "an integer", float: "a number", str: "text"}


@dataclass(frozen=True)
class Placement:
    """One deployment: Ray Serve `num_replicas`, the `ray_actor_options` each replica asks for, and
    (stages) the ort device its graphs open on. workers (ingress only): pipeline runs one ingress
    replica has in flight; 0 means one per stage replica, enough to keep every stage replica busy."""

    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float | None = None  # None: 1 when device is cuda/tensorrt, else 0
    device: str = "cpu"
    workers: int = 0

    def resolved(self, name: str) -> Placement:
        gpus = self.num_gpus if self.num_gpus is not None else (0.0 if self.device == "cpu" else 1.0)
        p = dataclasses.replace(self, num_gpus=gpus)
        if p.replicas < 1 or p.num_cpus < 0 or gpus < 0 or p.workers < 0:
            raise ValueError(f"--ray-{name}: replicas must be >= 1 and num_cpus, num_gpus, workers >= 0, got {p}")
        if p.device not in DEVICES:
            raise ValueError(f"--ray-{name}: device must be one of {list(DEVICES)}, got {p.device!r}")
        if p.device != "cpu" and gpus == 0:  # Ray sets CUDA_VISIBLE_DEVICES="" for such actors
            raise ValueError(f"--ray-{name}: device={p.device} needs num_gpus > 0 (Ray hides the GPUs from "
                             "replicas that ask for none; num_gpus=0.5 shares a GPU between two replicas)")
        if p.device == "cpu" and gpus > 0:
            raise ValueError(f"--ray-{name}: num_gpus={gpus:g} reserves GPUs that device=cpu never uses; "
                             "set device=cuda (or tensorrt) or num_gpus=0")
        return p


def parse_placement(name: str, text: str, base: Placement) -> Placement:
    """"replicas=2,num_gpus=1" -> `base` with those fields replaced; unknown keys are errors."""
    keys = INGRESS_KEYS if name == "ingress" else STAGE_KEYS
    changes = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in keys:
            raise ValueError(f"--ray-{name}: {item!r} is not KEY=VALUE with KEY one of {list(keys)}")
        try:
            changes[key] = keys[key](value)
        except ValueError:
            raise ValueError(f"--ray-{name}: {key} must be {_KINDS[keys[key]]}, got {value!r}") from None
    return dataclasses.replace(base, **changes)


@dataclass(frozen=True)
class RayAppConfig:
    """Everything `build_app` deploys. engines: an absolute path that every node running a stage has."""

    engines: str
    pipeline: PipelineConfig
    stages: dict[str, Placement]  # "gse", "lpr", "sam2" -> resolved placement
    ingress: Placement
    max_queue: int = 8
    max_image_mb: float = 20.0
    timeout_s: float = 120.0
    image_root: str | None = None
    allow_forced: bool = False

    @property
    def workers(self) -> int:
        return self.ingress.workers or sum(p.replicas for p in self.stages.values())


# ---------------------------------------------------------------- stage replicas


def load_part(engines: str, part: str, device: str):
    """(OrtGenerator for ENGINES/gse|lpr or OrtSAM2 for ENGINES/sam2, manifest): `backends.ort.load_part`."""
    from .backends.ort import load_part as load_ort_part

    return load_ort_part(engines, part, device)


class GeneratorReplica:
    """GSE or LPR replica: the `Generator` protocol served by one OrtGenerator. Serve runs this sync
    method on a thread; max_ongoing_requests=1 keeps it to one call at a time per replica."""

    def __init__(self, engines: str, stage: str, device: str):
        self.generator, self.manifest = load_part(engines, stage, device)

    def generate(self, image, user_text: str, *, max_new_tokens: int, forced_text: str | None = None):
        """image: (h, w, 3) uint8 RGB at the stage's input size -> `vlm.Generation`."""
        return self.generator.generate(image, user_text, max_new_tokens=max_new_tokens, forced_text=forced_text)

    def precision(self) -> str:
        return self.manifest["precision"]


class SAM2Replica:
    """SAM2 replica: set_image + predict in one call, since consecutive calls may reach different
    replicas and the encoder features (~16 MB) are not worth shipping back to the caller."""

    def __init__(self, engines: str, stage: str, device: str):
        self.predictor, _ = load_part(engines, stage, device)
        self._lock = threading.Lock()  # the predictor holds the image set between the two phases

    def predict_region(self, region, box, points, labels, multimask_output: bool):
        """region (h, w, 3) uint8; prompts in region pixels -> (masks (K, h, w) bool, scores (K,), encoder ms)."""
        with self._lock:
            t = time.perf_counter()
            self.predictor.set_image(region)
            encoder_ms = (time.perf_counter() - t) * 1e3
            masks, scores = self.predictor.predict(box, points, labels, multimask_output)
        return masks, scores, encoder_ms


# ---------------------------------------------------------------- the ingress side


class RemoteGenerator:
    """`Generator` whose generate() runs on a GSE or LPR deployment. Blocks: call it from a worker
    thread (DeploymentResponse.result() refuses to block an event loop)."""

    def __init__(self, handle):
        self.handle = handle

    def generate(self, image, user_text: str, *, max_new_tokens: int, forced_text: str | None = None):
        call = self.handle.generate.remote(image, user_text, max_new_tokens=max_new_tokens, forced_text=forced_text)
        return call.result()

    def close(self) -> None:  # the replicas own the sessions
        pass


class RayPipeline(Pipeline):
    """`Pipeline.run` unchanged, with GSE/LPR generation and SAM2 on deployments (thread-safe: no
    state between calls, so the service may run several at once). backend stays "ort": Ray moves
    the calls, ort computes them, and the Result equals the plain service's but for timings."""

    def __init__(self, gse, lpr, sam2, *, config: PipelineConfig, precision: str):
        super().__init__(RemoteGenerator(gse), RemoteGenerator(lpr), sam2, config=config,
                         backend="ort", precision=precision, host_threads=HOST_THREADS)

    def _segment(self, region, box, points, res, ms):
        """Pipeline._segment over one remote call. sam2_encoder: the replica's encoder time;
        sam2_decoder: the rest of the round trip (decoder, mask upsampling, transfer, routing)."""
        t = time.perf_counter()
        call = self.sam2.predict_region.remote(region, *prompt_arrays(box, points), self.config.multimask_output)
        masks, scores, encoder_ms = call.result()
        mask, res.sam2_score = best_mask(masks, scores)
        ms["sam2_encoder"] = encoder_ms
        ms["sam2_decoder"] = (time.perf_counter() - t) * 1e3 - encoder_ms
        return mask


class Ingress:
    """HTTP ingress replica: `serve.create_app` around a RayPipeline (wrapped by `serve.ingress()`,
    which calls __serve_build_asgi_app__ after __init__ and runs the app's lifespan: worker, warm-up)."""

    async def __init__(self, gse, lpr, sam2, cfg: RayAppConfig):
        precision = await gse.precision.remote()
        self.cfg = cfg
        self.pipeline = RayPipeline(gse, lpr, sam2, config=cfg.pipeline, precision=precision)
        self.service = None  # serve.Service, once the app is built (`self.app` is Serve's property)

    def __serve_build_asgi_app__(self):
        from .serve import create_app

        c = self.cfg
        asgi = create_app(self.pipeline, max_queue=c.max_queue, max_image_mb=c.max_image_mb,
                          timeout_s=c.timeout_s, image_root=c.image_root, allow_forced=c.allow_forced,
                          workers=c.workers)
        self.service = asgi.state.service
        return asgi

    def check_health(self):
        """Ray Serve's replica health check: a failed warm-up restarts the replica."""
        if self.service is not None and self.service.state == "failed":
            raise RuntimeError(self.service.state_detail)


def build_app(cfg: RayAppConfig):
    """The Ray Serve Application: GSE, LPR and SAM2 deployments bound into the Ingress."""
    from ray import serve

    handles = []
    for name in STAGES:
        p = cfg.stages[name]
        cls = SAM2Replica if name == "sam2" else GeneratorReplica
        dep = serve.deployment(cls).options(
            name=name.upper(), num_replicas=p.replicas, max_ongoing_requests=1,  # queue at the caller
            ray_actor_options={"num_cpus": p.num_cpus, "num_gpus": p.num_gpus})
        handles.append(dep.bind(cfg.engines, name, p.device))
    ingress = serve.deployment(serve.ingress()(Ingress)).options(
        name="Ingress", num_replicas=cfg.ingress.replicas,
        max_ongoing_requests=cfg.workers + cfg.max_queue + INGRESS_HEADROOM,
        ray_actor_options={"num_cpus": cfg.ingress.num_cpus})
    return ingress.bind(*handles, cfg)


# ---------------------------------------------------------------- configuration and the CLI


def add_ray_args(p: argparse.ArgumentParser) -> None:
    """The --ray options of `finers-rt serve` (no Ray import)."""
    g = p.add_argument_group("Ray Serve (--ray)")
    g.add_argument("--ray", action="store_true",
                   help="serve on Ray Serve: GSE, LPR and SAM2 as separate deployments (needs the [ray] extra; "
                        "ort engines only)")
    g.add_argument("--address", default=None,
                   help="Ray cluster to join: HEAD_IP:6379, auto (the one `ray start` made here) or local (a new "
                        "instance); default: $RAY_ADDRESS, else the cluster started here, else a new one")
    for name, what in (("gse", "GSE"), ("lpr", "LPR"), ("sam2", "SAM2")):
        g.add_argument(f"--ray-{name}", default="", metavar="KEY=V,...",
                       help=f"{what} deployment: replicas, num_cpus (1), num_gpus (1 on cuda/tensorrt, else 0), "
                            "device (--device)")
    g.add_argument("--ray-ingress", default="", metavar="KEY=V,...",
                   help="HTTP ingress deployment: replicas, num_cpus (1), workers (pipeline runs in flight per "
                        "replica; default one per stage replica)")


def config_from_args(args) -> RayAppConfig:
    """`finers-rt serve` arguments -> RayAppConfig (checked here, before anything is deployed)."""
    from .cli import _pipeline_config

    if args.checkpoints is not None or args.backend == "torch" or args.engines is None:
        raise ValueError("--ray serves exported ort engines: pass --engines DIR "
                         "(build one with `finers-rt export --checkpoints CKPT --out DIR`)")
    stages = {name: parse_placement(name, getattr(args, f"ray_{name}"), Placement(device=args.device)).resolved(name)
              for name in STAGES}
    ingress = parse_placement("ingress", args.ray_ingress, Placement()).resolved("ingress")
    return RayAppConfig(engines=str(Path(args.engines).resolve()), pipeline=_pipeline_config(args), stages=stages,
                        ingress=ingress, max_queue=args.max_queue, max_image_mb=args.max_image_mb,
                        timeout_s=args.timeout_s, allow_forced=args.force_output_from_request,
                        image_root=str(Path(args.image_root).resolve()) if args.image_root else None)


def app(args: dict):
    """`serve run finers_rt.serve_ray:app engines=DIR ray-gse=replicas=2,num_gpus=1 ...`: each KEY=VALUE
    is the `finers-rt serve` option --KEY VALUE (true/false for switches); the HTTP port is Serve's own."""
    return build_app(config_from_builder_args(args))


def config_from_builder_args(args: dict) -> RayAppConfig:
    """`serve run` builder arguments {KEY: VALUE} -> RayAppConfig, through the `finers-rt serve` parser."""
    from .serve import add_serve_parser

    parser = add_serve_parser(argparse.ArgumentParser(prog="serve run").add_subparsers())
    argv = []
    for key, value in args.items():
        if key in ("host", "port", "ray", "address"):
            raise ValueError(f"{key}= is not a builder argument under `serve run` (Serve owns the HTTP "
                             "options and the cluster; see `serve run --help`)")
        flag, value = f"--{key.replace('_', '-')}", str(value)
        if value.lower() == "true":
            argv.append(flag)
        elif value.lower() == "false":  # --no-X where the switch has one (--lpr-channel-swap), else absent
            argv += [f"--no-{flag[2:]}"] if f"--no-{flag[2:]}" in parser._option_string_actions else []
        else:
            argv += [flag, value]
    return config_from_args(parser.parse_args(argv))


def cmd_serve_ray(args) -> None:
    """Deploy on Ray (local, or the cluster at --address) and serve until SIGTERM/SIGINT, then
    delete the app (its replicas drain: accepted requests finish)."""
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import ray
        from ray import serve
    except ImportError as e:
        raise ImportError(f"`finers-rt serve --ray` needs the ray and serve extras: "
                          f"pip install 'finers-rt[serve,ray]' ({e})") from None
    cfg = config_from_args(args)
    ray.init(address=args.address)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        log.info("finers on Ray Serve at http://%s:%d (/healthz turns 200 after the warm-up run)",
                 args.host, args.port)
        _wait_for_signal()
        serve.delete(APP_NAME)
    finally:
        ray.shutdown()


def _wait_for_signal() -> None:
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
