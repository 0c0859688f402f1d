"""`finers-rt serve --ray`: the Ray Serve app (GSE, LPR, SAM2 and Ingress deployments on a local Ray)
answers the same requests with the same bodies as the plain service, timings aside.

Both run the tiny exported engines in forced-output mode (random weights produce gibberish). The Ray
app is built through the `serve run` builder (`finers_rt.serve_ray:app`), which parses its arguments
with the `finers-rt serve` parser, so the CLI's --ray-* options are exercised too.
"""
import io
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

for _m in ("fastapi", "uvicorn", "python_multipart", "httpx"):
    pytest.importorskip(_m, reason="the service needs the [serve] extra")

import httpx
from fastapi.testclient import TestClient

from finers_rt.serve import add_serve_parser, create_app
from finers_rt.serve_ray import (
    APP_NAME,
    Placement,
    config_from_args,
    config_from_builder_args,
    parse_placement,
)

# 1280x720 frame: GSE [900,500,1156,756] in 1920x1080 space -> the crop; LPR gives box + points.
FULL = {
    "gse": "<think>a</think><answer>{'bbox': [900,500,1156,756], 'response': 'The object is found.'}</answer>",
    "lpr": "<answer>{'bbox': [10,20,30,40], 'points_1': [15,25], 'points_2': [20,30]}</answer>",
}
# LPR gives points but no box: parse status no_bbox, SAM2 runs on the two points alone.
POINTS_ONLY = {
    "gse": "<answer>{'bbox': [100,100,300,260], 'response': 'B'}</answer>",
    "lpr": "<answer>{'points_1': [100,120], 'points_2': [300,310]}</answer>",
}
REQUESTS = {  # request_id -> form fields (the image is added by _post)
    "full": {"question": "the red car", "force_output": json.dumps(FULL)},
    "points-only": {"question": "which colour?", "task": "option", "options": "['A. red', 'B. blue']",
                    "return": "mask_png", "force_output": json.dumps(POINTS_ONLY)},
}
INVALID = {  # name -> (form fields, image bytes or None)
    "empty_question": ({"question": " "}, "png"),
    "undecodable": ({"question": "q"}, b"not an image"),
    "no_image": ({"question": "q"}, None),
    "bad_force_output": ({"question": "q", "force_output": "{'gse': 1}"}, "png"),
    "bad_task": ({"question": "q", "task": "segmentation"}, "png"),
}
STAGE_CPUS = "num_cpus=0.25"  # four deployments fit the 2-CPU local Ray with room for the controller
NOT_COMPARED = ("timings_ms", "tokens_per_s")  # wall-clock; tokens_per_s is derived from timings


def _frame() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (720, 1280, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _post(client, fields: dict, image: bytes | None):
    files = {k: (None, v) for k, v in fields.items()}
    if image is not None:
        files["image"] = ("frame.png", image)
    return client.post("/v1/segment", files=files)


def _until(cond, timeout_s: float, what: str):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.25)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(client) -> bool:
    """/healthz is 200; a failed warm-up fails the test at once with its detail."""
    try:
        r = client.get("/healthz")
    except httpx.TransportError:
        return False
    if r.status_code == 503 and r.json().get("detail", "").startswith("warm-up failed"):
        pytest.fail(r.json()["detail"])
    return r.status_code == 200


def _plain_requests(client) -> dict:
    """Every request of this file, sent to `client` -> {name: httpx.Response}."""
    frame = _frame()
    answers = {rid: _post(client, {**f, "request_id": rid}, frame) for rid, f in REQUESTS.items()}
    for name, (fields, image) in INVALID.items():
        answers[name] = _post(client, fields, frame if image == "png" else image)
    answers["healthz"], answers["missing"] = client.get("/healthz"), client.get("/v2/nothing")
    return answers


@pytest.fixture(scope="module")
def plain(tiny_engines):
    """The plain service's answers to every request here. Its pipeline is freed before Ray starts:
    the replicas load their own copies (the GSE one alone holds ~2.6 GB while it runs)."""
    from finers_rt.pipeline import Pipeline

    pipe = Pipeline.from_engines(tiny_engines, device="cpu")
    app = create_app(pipe, max_queue=4, max_image_mb=8, timeout_s=300, allow_forced=True)
    with TestClient(app) as client:
        _until(lambda: _healthy(client), 120, "plain /healthz 200")
        answers = _plain_requests(client)
    pipe.close()
    return answers


@pytest.fixture(scope="module")
def on_ray(tiny_engines, plain):
    """An httpx client for the Ray Serve app on a fresh local Ray (started after `plain` is done);
    Serve and Ray are shut down after."""
    pytest.importorskip("ray", reason="the Ray Serve app needs the [ray] extra")
    import ray
    from ray import serve

    from finers_rt.serve_ray import app as builder

    saved = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no usage report attempt from the test machine
    port = _free_port()
    # memory_monitor_refresh_ms=0: the test machine is shared, and Ray's monitor, which counts every
    # process's memory, would kill our replicas when other work fills the node past 95 %.
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=300 * 2**20,
             _system_config={"memory_monitor_refresh_ms": 0})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {"engines": str(tiny_engines), "ray-gse": STAGE_CPUS, "ray-lpr": STAGE_CPUS, "ray_sam2": STAGE_CPUS,
                "ray-ingress": f"{STAGE_CPUS},workers=2", "max-queue": "4", "max-image-mb": "8", "timeout-s": "300",
                "force-output-from-request": "true"}
        serve.run(builder(args), name=APP_NAME, route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            _until(lambda: _healthy(client), 180, "Ray /healthz 200 (warm-up through every deployment)")
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
        else:
            os.environ["RAY_USAGE_STATS_ENABLED"] = saved


def test_ray_app_answers_as_the_plain_service(plain, on_ray):
    frame = _frame()
    with ThreadPoolExecutor(len(REQUESTS)) as pool:  # concurrently on Ray: two runs in flight
        futures = {rid: pool.submit(_post, on_ray, {**f, "request_id": rid}, frame) for rid, f in REQUESTS.items()}
        ray_bodies = {rid: fut.result() for rid, fut in futures.items()}
    for rid in REQUESTS:
        want, got = plain[rid], ray_bodies[rid]
        assert (got.status_code, want.status_code) == (200, 200), (got.text, want.text)
        assert rid in got.headers.get_list("x-request-id")  # Ray's proxy adds its own id beside ours
        w, g = want.json(), got.json()
        assert set(g["timings_ms"]) == set(w["timings_ms"])  # every stage ran on both
        for key in NOT_COMPARED:
            w.pop(key), g.pop(key)
        assert g == w  # answer, boxes, points, mask (RLE / PNG), parse status, prompts, texts, score
    full, points_only = ray_bodies["full"].json(), ray_bodies["points-only"].json()
    assert full["lpr_box"] == [440, 182, 460, 202] and full["mask_area"] > 0  # 1280x720 frame, crop at (430, 162)
    assert points_only["parse"] == {"gse": "ok", "lpr": "no_bbox"} and points_only["sam2_score"] is not None


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_request_gets_the_same_error(plain, on_ray, name):
    fields, image = INVALID[name]
    image = _frame() if image == "png" else image
    want, got = plain[name], _post(on_ray, fields, image)
    w, g = want.json(), got.json()
    assert 400 <= want.status_code < 500 and got.status_code == want.status_code, (w, g)
    w.pop("request_id"), g.pop("request_id")  # a fresh id per request when none is sent
    assert g == w


def test_health_metrics_and_unknown_route(plain, on_ray):
    assert on_ray.get("/healthz").json() == plain["healthz"].json() == {
        "status": "ready", "backend": "ort", "precision": "fp32"}
    missing = on_ray.get("/v2/nothing")
    assert missing.status_code == 404 and missing.json() == plain["missing"].json()
    text = on_ray.get("/metrics").text
    assert 'finers_stage_seconds_count{stage="sam2_encoder"}' in text and "finers_ready 1" in text
    assert 'finers_requests_total{outcome="ok",status="200"}' in text


# ------------------------------------------------------------------ configuration (no Ray needed)


def _serve_args(*argv):
    import argparse

    return add_serve_parser(argparse.ArgumentParser().add_subparsers()).parse_args(list(argv))


def test_placements_from_cli_flags():
    cfg = config_from_args(_serve_args("--ray", "--engines", "E", "--device", "cuda", "--ray-gse", "replicas=2",
                                       "--ray-sam2", "num_gpus=0.5,num_cpus=2", "--ray-lpr", "device=cpu"))
    gse, lpr, sam2 = (cfg.stages[s] for s in ("gse", "lpr", "sam2"))
    assert (gse.replicas, gse.num_gpus, gse.device) == (2, 1.0, "cuda")  # cuda: one GPU unless told
    assert (lpr.num_gpus, lpr.device) == (0.0, "cpu")
    assert (sam2.num_gpus, sam2.num_cpus) == (0.5, 2.0)
    assert cfg.workers == 4 and cfg.engines.startswith("/")  # one per stage replica; absolute for the nodes


@pytest.mark.parametrize("flag, value, words", [
    ("--ray-gse", "replica=2", "not KEY=VALUE"),
    ("--ray-gse", "replicas=two", "replicas must be an integer"),
    ("--ray-lpr", "device=cuda,num_gpus=0", "needs num_gpus > 0"),
    ("--ray-sam2", "num_gpus=1", "device=cpu never uses"),
    ("--ray-sam2", "device=npu", "device must be one of"),
    ("--ray-ingress", "num_gpus=1", "not KEY=VALUE"),
    ("--ray-ingress", "replicas=0", "replicas must be >= 1"),
])
def test_bad_placement_is_a_clear_error(flag, value, words):
    with pytest.raises(ValueError, match=words):
        config_from_args(_serve_args("--ray", "--engines", "E", flag, value))


def test_ray_serves_engines_only():
    with pytest.raises(ValueError, match="--engines DIR"):
        config_from_args(_serve_args("--ray", "--checkpoints", "C"))
    assert parse_placement("gse", "", Placement(device="cuda")) == Placement(device="cuda")


def test_serve_run_builder_arguments_are_serve_options():
    cfg = config_from_builder_args({"engines": "E", "ray_sam2": "replicas=3", "lpr-channel-swap": "false",
                                    "force-output-from-request": "true", "preset": "corrected", "max-queue": "2"})
    assert cfg.stages["sam2"].replicas == 3 and cfg.allow_forced and cfg.max_queue == 2
    assert not cfg.pipeline.lpr_channel_swap and cfg.pipeline.region_mode == "shift"  # preset, then the switch
    assert config_from_builder_args({"engines": "E", "force-output-from-request": "false"}).allow_forced is False
    with pytest.raises(ValueError, match="Serve owns the HTTP options"):
        config_from_builder_args({"engines": "E", "port": "8080"})


def test_cli_does_not_import_ray():
    code = ("import sys; from finers_rt.cli import build_parser; from finers_rt.serve_ray import config_from_args; "
            "config_from_args(build_parser().parse_args(['serve', '--ray', '--engines', 'E'])); "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
