"""`finers-rt serve`: the pipeline behind HTTP. POST /v1/segment, GET /healthz, GET /metrics.

One pipeline, one worker thread: the pipeline is not thread-safe, so every `Pipeline.run` happens
on a single executor thread and requests wait in a bounded asyncio queue in front of it (full ->
429). Bad input is refused before it reaches the queue, as `{"error": code, "detail": message}`
with a 4xx. (More worker threads only for a thread-safe pipeline: `serve_ray`'s, whose runs mostly
wait on the remote stages.) FastAPI and uvicorn are imported only when serving, so the rest of
`finers-rt` works without the [serve] extra.
"""
# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime, and
# `Request` is imported inside create_app (lazily), where string annotations would not resolve.
import argparse
import asyncio
import functools
import logging
import math
import signal
import threading
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import numpy as np

from .image import ImageLoadError
from .serve_request import (  # noqa: F401  (rle_encode: re-exported for clients and tests)
    FORM_SCHEMA,
    ApiError,
    SegmentRequest,
    decode_image,
    parse_fields,
    read_form,
    read_under_root,
    response_body,
    rle_encode,
)
from .serve_worker import Metrics, Worker

log = logging.getLogger(__name__)

WARMUP_FORCE = {
    "gse": "<answer>{'bbox': [832,412,1088,668], 'response': 'The object is found.'}</answer>",
    "lpr": "<answer>{'bbox': [200,200,300,300], 'points_1': [240,240], 'points_2': [260,260]}</answer>",
}
# ---------------------------------------------------------------- the service


class Service:
    """State shared by the routes: the pipeline, its worker, metrics, readiness and draining."""

    def __init__(self, pipeline, *, max_queue: int, max_image_mb: float, timeout_s: float,
                 image_root: str | Path | None, allow_forced: bool, workers: int = 1, max_batch: int = 1):
        if max_queue < 1 or workers < 1 or max_batch < 1 or max_image_mb <= 0 or timeout_s <= 0:
            raise ValueError("max_queue, workers and max_batch must be >= 1, max_image_mb and timeout_s > 0")
        if max_batch > 1 and not hasattr(pipeline, "run_batch"):
            raise ValueError(f"--max-batch {max_batch} needs a pipeline with run_batch; this one has none")
        self.max_batch = max_batch
        self.pipeline, self.max_queue, self.timeout_s, self.workers = pipeline, max_queue, timeout_s, workers
        self.max_image_bytes = int(max_image_mb * 2**20)
        self.image_root = Path(image_root).resolve() if image_root is not None else None
        self.allow_forced = allow_forced
        self.metrics = Metrics()
        self.state = "starting"  # starting -> warming_up -> ready | failed
        self.state_detail = "the service is starting"
        self.draining = False  # set on SIGTERM: new requests get 503
        self.worker: Worker | None = None

    async def start(self):
        """Start the worker and queue the warm-up run (the routes need the running loop for both)."""
        self.worker = Worker(self.max_queue, self.metrics, self.workers, max_batch=self.max_batch,
                             run_batch=self.pipeline.run_batch if self.max_batch > 1 else None)
        self._decode_slots = asyncio.Semaphore(2)  # bounds decoded images held before queueing
        self.state, self.state_detail = "warming_up", "the pipeline is warming up"
        self._warmup = asyncio.create_task(self._warm_up())

    async def _warm_up(self):
        image = np.full((256, 256, 3), 128, dtype=np.uint8)
        call = functools.partial(self.pipeline.run, image, "warm-up", force_output=WARMUP_FORCE)
        try:
            await self.worker.submit(call, record=False)
        except Exception as e:  # reported by /healthz
            log.exception("warm-up failed")
            self.state, self.state_detail = "failed", f"warm-up failed: {type(e).__name__}: {e}"
        else:
            self.state, self.state_detail = "ready", "ready"
            log.info("pipeline warmed up; ready")

    async def stop(self):
        self.draining = True
        await self.worker.close()

    def _check_accepting(self):
        if self.draining:
            raise ApiError(503, "shutting_down", "the server is shutting down", {"Retry-After": "5"})
        if self.state != "ready":
            raise ApiError(503, "not_ready", self.state_detail, {"Retry-After": "5"})

    def _queue_full(self) -> ApiError:
        wait = math.ceil(self.metrics.mean_total_s() * (self.worker.queue.qsize() + 1) / self.workers)
        return ApiError(429, "queue_full", f"{self.worker.queue.qsize()} requests are already waiting "
                                           f"(--max-queue {self.max_queue})", {"Retry-After": str(max(wait, 1))})

    async def segment(self, request):
        from fastapi.responses import JSONResponse
        from starlette.concurrency import run_in_threadpool

        deadline = time.monotonic() + self.timeout_s
        rid = uuid.uuid4().hex
        try:
            self._check_accepting()
            fields = await read_form(request, self.max_image_bytes)
            req = parse_fields(fields, allow_forced=self.allow_forced, request_id=rid)
            rid = req.request_id
            res = await self._run(req, deadline)
            resp = JSONResponse(await run_in_threadpool(response_body, res, req), headers={"X-Request-ID": rid})
            outcome = "ok"
        except ApiError as e:
            resp, outcome = e.response(rid), e.code
        except Exception as e:  # a bug, not bad input: log it, answer 500 in our format
            log.exception("request %s failed", rid)
            err = ApiError(500, "internal_error", f"{type(e).__name__} in the server; see its log for request {rid}")
            resp, outcome = err.response(rid), err.code
        self.metrics.count(outcome, resp.status_code)
        log.info("request %s: %d %s", rid, resp.status_code, outcome)
        return resp

    async def _run(self, req: SegmentRequest, deadline: float):
        from starlette.concurrency import run_in_threadpool

        if self.worker.queue.full():  # refuse before decoding anything
            raise self._queue_full()
        async with self._decode_slots:
            image = await run_in_threadpool(self._load, req)
        call = functools.partial(self.pipeline.run, image, req.question, task=req.task, options=req.options,
                                 force_output=req.force_output)
        batchable = None
        if self.max_batch > 1:  # the same call, as run_batch takes it
            from .batch import Request

            batchable = Request(image, req.question, req.task, req.options, req.force_output)
        try:
            fut = self.worker.submit(call, request=batchable)
        except asyncio.QueueFull:
            raise self._queue_full() from None
        try:
            return await asyncio.wait_for(fut, max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:  # TimeoutError on 3.11+, a separate class on 3.10
            raise ApiError(504, "timeout", f"no result within {self.timeout_s:g} s (queue wait included); "
                                           "the request was dropped") from None
        except ImageLoadError as e:
            raise ApiError(415, "undecodable_image", str(e)) from None
        except ValueError as e:  # the pipeline's own input checks
            raise ApiError(422, "invalid_request", str(e)) from None

    def _load(self, req: SegmentRequest) -> np.ndarray:
        if req.image is not None:
            return decode_image(req.image, "image")
        data = read_under_root(self.image_root, req.image_path, self.max_image_bytes)
        return decode_image(data, f"image_path {req.image_path!r}")

    def healthz(self) -> tuple[int, dict]:
        if self.draining:
            return 503, {"error": "shutting_down", "detail": "the server is shutting down"}
        if self.state != "ready":
            return 503, {"error": "not_ready", "detail": self.state_detail}
        return 200, {"status": "ready", "backend": getattr(self.pipeline, "backend", ""),
                     "precision": getattr(self.pipeline, "precision", "")}

    def metrics_text(self) -> str:
        w = self.worker
        return self.metrics.render({
            "finers_queue_depth": ("Requests waiting for the pipeline worker.", w.queue.qsize() if w else 0),
            "finers_worker_busy": ("Pipeline calls running on the worker threads (0/1 with one worker).",
                                   w.running if w else 0),
            "finers_ready": ("Whether the pipeline is loaded and warmed up (0/1).", int(self.state == "ready")),
            "finers_draining": ("Whether SIGTERM was received and new requests are refused (0/1).", int(self.draining)),
        })


def create_app(pipeline, *, max_queue: int, max_image_mb: float, timeout_s: float,
               image_root: str | Path | None = None, allow_forced: bool = False, workers: int = 1,
               max_batch: int = 1):
    """The FastAPI app serving `pipeline` (anything with `Pipeline.run`'s signature returning a Result).

    The worker starts and the warm-up run is queued at app startup; /healthz is 503 until it is done.
    workers: pipeline calls run at once (> 1 only if `pipeline.run` is thread-safe).
    max_batch: > 1 runs requests already waiting together through `pipeline.run_batch` (up to this many).
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException

    from . import __version__

    service = Service(pipeline, max_queue=max_queue, max_image_mb=max_image_mb, timeout_s=timeout_s,
                      image_root=image_root, allow_forced=allow_forced, workers=workers, max_batch=max_batch)

    @asynccontextmanager
    async def lifespan(app):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="finers-rt", version=__version__, lifespan=lifespan,
                  description="FineRS segmentation (GSE -> region -> LPR -> SAM2) over HTTP.")
    app.state.service = service

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # unknown routes and methods, in the same JSON shape
        return ApiError(exc.status_code, "http_error", str(exc.detail)).response()

    @app.post("/v1/segment", summary="Segment what the question refers to",
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"multipart/form-data": {"schema": FORM_SCHEMA}}}})
    async def segment(request: Request):
        """Result.to_dict() + `mask` (as `return` asks) + `request_id`; errors are {"error", "detail"}."""
        return await service.segment(request)

    @app.get("/healthz", summary="200 once the pipeline is loaded and warmed up")
    async def healthz():
        status, body = service.healthz()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics", summary="Prometheus text format", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(service.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


# ---------------------------------------------------------------- running it


def run_server(app, *, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    """Serve `app` until SIGTERM/SIGINT, then drain: new requests get 503 (the listening socket is
    closed), accepted ones finish, the worker stops; returns normally (exit status 0)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on"))
    uvicorn_exit = server.handle_exit

    def handle_exit(sig, frame):
        app.state.service.draining = True
        uvicorn_exit(sig, frame)

    server.handle_exit = handle_exit  # uvicorn installs `server.handle_exit` as the signal handler
    with _signals_ignored_afterwards():
        server.run()
    if not server.started:
        raise OSError(f"the server did not start on {host}:{port} (see the log above)")


@contextmanager
def _signals_ignored_afterwards():
    """uvicorn re-raises a captured SIGTERM/SIGINT after its graceful shutdown, which would kill the
    process with that signal; with SIG_IGN as the handler it restores, the drained process exits 0."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_serve_parser(sub) -> argparse.ArgumentParser:
    """Register `finers-rt serve` on the CLI's subparsers; the handler is `args.func(args)`."""
    from .cli import _add_pipeline_args
    from .serve_ray import add_ray_args

    p = sub.add_parser("serve", help="HTTP service: POST /v1/segment, GET /healthz, GET /metrics")
    _add_pipeline_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-queue", type=_positive_int, default=8,
                   help="requests that may wait behind the running one; more get 429 (default 8)")
    p.add_argument("--max-image-mb", type=float, default=20.0, help="largest accepted image file (default 20)")
    p.add_argument("--timeout-s", type=float, default=120.0,
                   help="per request, queue wait included; later gets 504 (default 120)")
    p.add_argument("--image-root", type=Path, default=None,
                   help="allow `image_path` form fields, resolved under this folder")
    p.add_argument("--max-batch", type=_positive_int, default=1,
                   help="run up to this many waiting requests as one Pipeline.run_batch (GSE, LPR batched "
                        "across requests); 1 (default): one at a time")
    p.add_argument("--force-output-from-request", action="store_true",
                   help="TESTING ONLY: accept a `force_output` form field scripting the stage texts")
    add_ray_args(p)
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args) -> None:
    """Load the pipeline (as `finers-rt run` does), then serve it until SIGTERM (--ray: on Ray Serve)."""
    from .cli import _load_pipeline
    from .serve_ray import cmd_serve_ray

    if args.ray:
        return cmd_serve_ray(args)
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"`finers-rt serve` needs the serve extra: pip install 'finers-rt[serve]' ({e})") from None
    pipeline = _load_pipeline(args)
    if args.force_output_from_request:
        log.warning("--force-output-from-request: clients may script the stage texts (testing only)")
    app = create_app(pipeline, max_queue=args.max_queue, max_image_mb=args.max_image_mb, timeout_s=args.timeout_s,
                     image_root=args.image_root, allow_forced=args.force_output_from_request,
                     max_batch=args.max_batch)
    try:
        level = "debug" if getattr(args, "verbose", False) else "info"
        run_server(app, host=args.host, port=args.port, log_level=level)
    finally:
        pipeline.close()
