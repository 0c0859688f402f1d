"""`finers-rt serve`: hostile inputs, boxes through HTTP, queueing, timeouts, health, metrics, SIGTERM.

Real-pipeline tests run the tiny exported engines in forced-output mode (random weights produce
gibberish). Queue, timeout, health and shutdown tests use `FakePipeline`, whose speed the test
controls. Requests are multipart: text fields go as `(None, value)` parts.
"""
import importlib.util
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

for _m in ("fastapi", "uvicorn", "python_multipart", "httpx"):
    pytest.importorskip(_m, reason="the service needs the [serve] extra")

from fastapi.testclient import TestClient

from finers_rt.client import (
    FinersClient,
    ServiceError,
    add_query_parser,
    mask_from_response,
    rle_decode,
)
from finers_rt.image import load_image
from finers_rt.result import Result
from finers_rt.serve import add_serve_parser, create_app, rle_encode

TESTS = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("make_hostile", TESTS / "data" / "hostile" / "make_hostile.py")
hostile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hostile)

# 3840x2160 frame: GSE [900,500,1156,756] (1920x1080 space) -> (1800,1000,2312,1512) = the crop;
# LPR [10,20,30,40] in 512x512 crop space + (1800,1000) -> (1810,1020,1830,1040).
FORCE_4K = {
    "gse": "<think>a</think><answer>{'bbox': [900,500,1156,756], 'response': 'The object is found.'}</answer>",
    "lpr": "<answer>{'bbox': [10,20,30,40], 'points_1': [15,25], 'points_2': [20,30]}</answer>",
}
NO_BOX = {"gse": "<answer>{'response': 'The object is not found.'}</answer>"}  # stops after GSE

# Undecodable or refused files: (status, error code, words the detail must contain).
REFUSED_FILES = {
    "truncated.jpg": (415, "undecodable_image", "truncated"),
    "truncated.png": (415, "undecodable_image", "truncated"),
    "corrupt_header.jpg": (415, "undecodable_image", "cannot decode"),
    "corrupt_scan.jpg": (415, "undecodable_image", "cannot decode"),
    "zero_bytes.jpg": (400, "empty_image", "empty"),
    "text.jpg": (415, "undecodable_image", "not a known image format"),
    "bomb_header.png": (413, "image_too_large", "too large"),
    "bomb_zeros.png": (413, "image_too_large", "6000x6000"),
}
# Decodable files -> upright (width, height). FULL_RUN ones get boxes, so every stage runs on them.
DECODED_FILES = {
    "png16.png": (64, 48), "grayscale.png": (64, 48), "palette.png": (64, 48), "rgba.png": (64, 48),
    "cmyk.jpg": (64, 48), "exif_rotated.jpg": (32, 64), "bad_exif.jpg": (64, 48), "one_pixel.png": (1, 1),
    "tall_8x8000.png": (8, 8000), "animated.gif": (48, 32),
}
FULL_RUN = {"exif_rotated.jpg", "tall_8x8000.png", "one_pixel.png"}
# Hostile form fields (sent with a valid image): (status, error code, words the detail must contain).
FIELD_CASES = {
    "empty_question": (422, "empty_question", "empty"),
    "huge_question": (422, "question_too_long", "20004"),
    "quotes_braces_controls": (200, None, None),
    "invalid_utf8": (400, "invalid_utf8", "'question'"),
    "bad_task": (422, "invalid_task", "'segmentation'"),
    "options_on_referring": (422, "invalid_options", "only used by task 'option'"),
    "option_without_options": (422, "invalid_options", "needs options"),
    "unknown_field": (422, "unknown_field", "colour"),
    "bad_return": (422, "invalid_return", "'polygon'"),
}


class FakePipeline:
    """`Pipeline.run`'s signature, no model. Runs wait while `gate` is clear; question "slow" sleeps
    `slow_s`. The mask is the top-left (H/2, W/3) block."""

    backend, precision = "fake", "fp32"

    def __init__(self, slow_s: float = 0.0, fail: bool = False):
        self.gate, self.started, self.slow_s, self.fail = threading.Event(), threading.Event(), slow_s, fail
        self.gate.set()

    def run(self, image, question, *, task="referring", options=None, force_output=None):
        self.started.set()
        self.gate.wait(30)
        if self.fail:
            raise RuntimeError("no model here")
        time.sleep(self.slow_s if question == "slow" else 0.0)
        img = load_image(image)
        h, w = img.shape[:2]
        res = Result(task=task, question=question, options=options, image_size=(w, h), backend=self.backend)
        res.mask = np.zeros((h, w), dtype=bool)
        res.mask[: h // 2, : w // 3] = True
        res.timings_ms = {"preprocess": 1.5, "gse_vision": 30.0, "total": 40.0}
        return res


def _png(w: int = 40, h: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 90, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _post(client, image: bytes | None = None, filename: str = "upload.png", **fields):
    """Multipart POST /v1/segment; `return_` is the `return` field; bytes values are sent raw."""
    if "return_" in fields:
        fields["return"] = fields.pop("return_")
    files = {k: (None, v) for k, v in fields.items()}
    if image is not None:
        files["image"] = (filename, image)
    return client.post("/v1/segment", files=files)


def _until(cond, timeout_s: float = 60.0, what: str = "condition"):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.02)


def _fake_app(fake=None, **kw):
    kw = {"max_queue": 2, "max_image_mb": 1, "timeout_s": 30, **kw}
    return create_app(fake or FakePipeline(), **kw)


def _ready(client):
    _until(lambda: client.get("/healthz").status_code == 200, what="/healthz 200")


def _assert_error(r, status, code, words):
    body = r.json()
    assert r.status_code == status, body
    assert body["error"] == code and words in body["detail"], body


def _assert_result(body, w, h):
    """A valid Result: sizes agree, the RLE mask has the image's shape and the reported area."""
    assert body["image_size"] == [w, h] and body["mask_shape"] == [h, w]
    mask = rle_decode(body["mask"])
    assert mask.shape == (h, w) and int(mask.sum()) == body["mask_area"]
    assert body["request_id"] and set(body["timings_ms"]) >= {"preprocess", "gse_vision", "total"}
    return mask


# ------------------------------------------------------------------ the real pipeline (tiny engines)


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile")
    hostile.make_hostile(out)
    return out


@pytest.fixture(scope="module")
def ort_pipe(tiny_engines):
    from finers_rt.pipeline import Pipeline

    return Pipeline.from_engines(tiny_engines, device="cpu")


@pytest.fixture(scope="module")
def served(ort_pipe, hostile_dir):
    app = create_app(ort_pipe, max_queue=4, max_image_mb=8, timeout_s=300, image_root=hostile_dir,
                     allow_forced=True)
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 503  # the warm-up run takes seconds
        _ready(client)
        yield client


@pytest.mark.parametrize("name", sorted(REFUSED_FILES))
def test_hostile_file_refused_over_http(served, hostile_dir, name):
    r = _post(served, (hostile_dir / name).read_bytes(), filename=name, question="the red car",
              force_output=json.dumps(NO_BOX))
    _assert_error(r, *REFUSED_FILES[name])


@pytest.mark.parametrize("name", sorted(DECODED_FILES))
def test_hostile_file_decoded_over_http(served, hostile_dir, name):
    force = FORCE_4K if name in FULL_RUN else NO_BOX
    r = _post(served, (hostile_dir / name).read_bytes(), filename=name, question="the red car",
              force_output=json.dumps(force))
    assert r.status_code == 200, r.json()
    w, h = DECODED_FILES[name]
    body = r.json()
    _assert_result(body, w, h)
    if name in FULL_RUN:  # every stage ran; boxes stay inside the image
        x0, y0, x1, y1 = body["crop_box"]
        assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h and body["sam2_score"] is not None
    else:
        assert body["gse_box"] is None and body["mask_area"] == 0


@pytest.mark.parametrize("case", sorted(FIELD_CASES))
def test_hostile_field(served, case):
    fields = {"question": "the red car", "force_output": json.dumps(NO_BOX), **hostile.HOSTILE_FIELDS[case]}
    r = _post(served, _png(), **fields)
    status, code, words = FIELD_CASES[case]
    if status != 200:
        return _assert_error(r, status, code, words)
    body = r.json()
    _assert_result(body, 40, 30)
    assert r.status_code == 200 and body["question"] == fields["question"]  # byte-exact round trip
    assert fields["question"] in body["prompts"]["gse"]  # substituted literally, braces and all


def test_forced_request_after_corpus_gives_right_boxes_and_exact_mask(served, ort_pipe):
    frame = io.BytesIO()
    hostile._rgb(3840, 2160, 42).save(frame, "JPEG", quality=90)
    r = _post(served, frame.getvalue(), filename="frame.jpg", question="the red car",
              force_output=json.dumps(FORCE_4K), request_id="frame-1")
    body = r.json()
    assert r.status_code == 200, body
    assert body["request_id"] == "frame-1" and r.headers["X-Request-ID"] == "frame-1" and body["forced"]
    assert body["gse_box"] == [1800, 1000, 2312, 1512] and body["crop_box"] == [1800, 1000, 2312, 1512]
    assert body["lpr_box"] == [1810, 1020, 1830, 1040] and body["points"] == [[1815, 1025], [1820, 1030]]
    assert body["parse"] == {"gse": "ok", "lpr": "ok"}
    mask = _assert_result(body, 3840, 2160)
    assert not mask[:1000].any() and not mask[:, :1800].any()  # only inside the crop
    ref = ort_pipe.run(frame.getvalue(), "the red car", force_output=FORCE_4K)  # same bytes, Python API
    assert np.array_equal(mask, ref.mask)


@pytest.mark.parametrize("name", sorted(set(REFUSED_FILES) - {"bomb_zeros.png"}))  # that one: next test
def test_hostile_file_python_api_raises_value_error(ort_pipe, hostile_dir, name):
    words = REFUSED_FILES[name][2].replace("empty", "cannot decode").replace("not a known image format", "cannot")
    with pytest.raises(ValueError, match=re.escape(name)) as e:
        ort_pipe.run(hostile_dir / name, "the red car")
    assert words in str(e.value)


@pytest.mark.parametrize("case", ["bad_task", "options_on_referring", "option_without_options"])
def test_hostile_fields_python_api_raise_value_error(ort_pipe, case):
    """Pipeline.run refuses these in the GSE prompt step, before any model runs."""
    kw = {"task": "referring", **hostile.HOSTILE_FIELDS[case]}
    with pytest.raises(ValueError, match="task"):
        ort_pipe.run(np.zeros((8, 8, 3), np.uint8), "the red car", task=kw["task"], options=kw.get("options"))


def test_python_api_refuses_bomb_between_1x_and_2x_limit(hostile_dir):
    with pytest.raises(ValueError, match="too large"):
        load_image(hostile_dir / "bomb_zeros.png")  # 6000x6000: 36 Mpx > 33.2 Mpx


@pytest.mark.parametrize("name", sorted(DECODED_FILES))
def test_hostile_file_python_api_decodes(hostile_dir, name):
    """Pipeline.run starts with this load_image call; the HTTP tests above ran the rest."""
    img = load_image(hostile_dir / name)
    w, h = DECODED_FILES[name]
    assert img.shape == (h, w, 3) and img.dtype == np.uint8


def test_png16_keeps_its_gradient(hostile_dir):
    img = load_image(hostile_dir / "png16.png")
    gray16 = np.asarray(Image.open(hostile_dir / "png16.png"), dtype=np.int64)
    assert np.abs(img[..., 0].astype(np.int64) - (gray16 >> 8)).max() <= 1


# ------------------------------------------------------------------ service behaviour (fake pipeline)


def test_rle_round_trip_and_coco_order():
    rng = np.random.default_rng(0)
    masks = [rng.random((37, 53)) > 0.5, np.ones((4, 3), bool), np.zeros((5, 2), bool), np.ones((1, 1), bool)]
    for m in masks:
        assert np.array_equal(rle_decode(rle_encode(m)), m)
    assert rle_encode(np.array([[0, 1], [1, 1]], bool)) == {"size": [2, 2], "counts": [1, 3]}  # column-major
    assert rle_encode(np.array([[1, 0], [0, 0]], bool)) == {"size": [2, 2], "counts": [0, 1, 3]}  # zeros first


def test_image_path_resolved_under_root_only(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(_png())
    (tmp_path / "secret.png").write_bytes(_png())
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    with TestClient(_fake_app(image_root=root)) as c:
        _ready(c)
        r = _post(c, question="q", image_path="sub/ok.png", return_="mask_png")
        assert r.status_code == 200 and mask_from_response(r.json()).shape == (30, 40)
        for bad in ("../x", "../secret.png", "sub/../../secret.png", "/etc/passwd", "link.png", "a\x00b"):
            _assert_error(_post(c, question="q", image_path=bad), 400, "image_path_refused", "outside the image root")
        _assert_error(_post(c, question="q", image_path="nope.png"), 400, "image_not_found", "nope.png")
        _assert_error(_post(c, _png(), question="q", image_path="sub/ok.png"), 400, "image_required", "exactly one")
    with TestClient(_fake_app()) as c:
        _ready(c)
        _assert_error(_post(c, question="q", image_path="sub/ok.png"), 400, "image_path_disabled", "--image-root")


def test_request_shape_errors():
    with TestClient(_fake_app(max_image_mb=0.01)) as c:
        _ready(c)
        _assert_error(c.post("/v1/segment", json={"question": "q"}), 415, "unsupported_media_type", "multipart")
        _assert_error(_post(c, question="q"), 400, "image_required", "exactly one")
        _assert_error(_post(c, bytes(20000), question="q"), 413, "too_large", "image")  # > 0.01 MB
        _assert_error(_post(c, _png(), question="q", force_output="{}"), 422, "force_output_disabled",
                      "--force-output-from-request")
        _assert_error(_post(c, _png(), question="q", request_id="a\nb"), 422, "invalid_request_id", "printable")
        _assert_error(c.get("/nope"), 404, "http_error", "Not Found")
        r = _post(c, _png(), question="q", request_id="abc-1", task="", options="")  # empty optional = absent
        assert r.status_code == 200 and r.json()["request_id"] == "abc-1"
        assert "/v1/segment" in c.get("/openapi.json").json()["paths"]


def test_queue_full_gives_429_with_retry_after():
    fake = FakePipeline()
    app = _fake_app(fake, max_queue=1)
    with TestClient(app) as c, ThreadPoolExecutor(2) as pool:
        _ready(c)
        fake.gate.clear()
        fake.started.clear()
        first = pool.submit(_post, c, _png(), question="first")
        assert fake.started.wait(10)  # running on the worker: the queue is empty again
        second = pool.submit(_post, c, _png(), question="second")
        _until(lambda: app.state.service.worker.queue.qsize() == 1, what="second request queued")
        r = _post(c, _png(), question="third")
        _assert_error(r, 429, "queue_full", "--max-queue 1")
        assert int(r.headers["Retry-After"]) >= 1
        fake.gate.set()
        assert first.result().status_code == 200 and second.result().status_code == 200


def test_timeout_gives_504_and_the_service_keeps_answering():
    fake = FakePipeline()
    with TestClient(_fake_app(fake, timeout_s=1.0)) as c:
        _ready(c)
        fake.gate.clear()
        _assert_error(_post(c, _png(), question="stuck"), 504, "timeout", "1 s")
        fake.gate.set()  # the worker finishes the stuck job; its result is discarded
        r = _post(c, _png(), question="next")
        assert r.status_code == 200 and r.json()["question"] == "next"
        m = parse_prometheus(c.get("/metrics").text)
        assert m["finers_requests_total", frozenset({("outcome", "timeout"), ("status", "504")})] == 1


def test_healthz_503_until_warm_up_finished():
    fake = FakePipeline()
    fake.gate.clear()  # holds the warm-up run
    with TestClient(_fake_app(fake)) as c:
        assert fake.started.wait(10)
        r = c.get("/healthz")
        assert r.status_code == 503 and "warming up" in r.json()["detail"]
        _assert_error(_post(c, _png(), question="q"), 503, "not_ready", "warming up")
        fake.gate.set()
        _ready(c)
        assert c.get("/healthz").json()["status"] == "ready"
    with TestClient(_fake_app(FakePipeline(fail=True))) as c:
        _until(lambda: "failed" in c.get("/healthz").json()["detail"], what="warm-up failure")
        assert c.get("/healthz").status_code == 503 and "no model here" in c.get("/healthz").json()["detail"]


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_]\w*="[^"\\\n]*",?)*)\})? (\S+)$')


def parse_prometheus(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text exposition -> {(name, labels): value}; asserts on every malformed line."""
    samples, typed = {}, {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram") and name not in typed
            typed[name] = kind
            continue
        if line.startswith("# HELP ") or not line:
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample: {line!r}"
        name, labels, value = m.groups()
        base = re.sub(r"_(bucket|sum|count)$", "", name) if name not in typed else name
        assert base in typed, f"{name} has no # TYPE line before it"
        pairs = frozenset(re.findall(r'(\w+)="([^"]*)"', labels or ""))
        samples[name, pairs] = float(value)
    return samples


def test_metrics_prometheus_text_with_counters_and_histograms():
    with TestClient(_fake_app()) as c:
        _ready(c)
        before = parse_prometheus(c.get("/metrics").text)
        for _ in range(2):
            assert _post(c, _png(), question="q").status_code == 200
        _post(c, b"", question="q")
        r = c.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        m = parse_prometheus(r.text)
    assert (("finers_requests_total", frozenset({("outcome", "ok"), ("status", "200")}))) not in before
    assert m["finers_requests_total", frozenset({("outcome", "ok"), ("status", "200")})] == 2
    assert m["finers_requests_total", frozenset({("outcome", "empty_image"), ("status", "400")})] == 1
    assert m["finers_queue_depth", frozenset()] == 0 and m["finers_ready", frozenset()] == 1
    for stage in ("preprocess", "gse_vision", "total"):  # the warm-up run is not counted
        buckets = sorted((float(dict(k[1])["le"]), v) for k, v in m.items()
                         if k[0] == "finers_stage_seconds_bucket" and ("stage", stage) in k[1])
        assert [v for _, v in buckets] == sorted(v for _, v in buckets) and buckets[-1] == (float("inf"), 2)
        assert m["finers_stage_seconds_count", frozenset({("stage", stage)})] == 2
    assert m["finers_stage_seconds_sum", frozenset({("stage", "total")})] == pytest.approx(0.08)


def test_cli_parsers_register():
    import argparse

    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command")
    add_serve_parser(sub)
    add_query_parser(sub)
    args = ap.parse_args(["serve", "--engines", "E", "--max-queue", "3", "--image-root", "imgs"])
    assert args.max_queue == 3 and args.host == "127.0.0.1" and not args.force_output_from_request
    assert callable(args.func)
    with pytest.raises(SystemExit):
        ap.parse_args(["serve", "--engines", "E", "--max-queue", "0"])
    assert ap.parse_args(["query", "--image", "x.jpg", "--question", "q"]).url == "http://127.0.0.1:8080"


# ------------------------------------------------------------------ SIGTERM on a real uvicorn process

_SERVE_FAKE = """
import sys
from test_serve import FakePipeline
from finers_rt.serve import create_app, run_server
app = create_app(FakePipeline(slow_s=3.0), max_queue=4, max_image_mb=1, timeout_s=60)
run_server(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(client) -> bool:
    try:
        return client.healthz()["status"] == "ready"
    except (OSError, ServiceError):
        return False


def test_sigterm_finishes_the_running_request_then_exits_0(tmp_path, capsys):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _SERVE_FAKE, str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = FinersClient(f"http://127.0.0.1:{port}", timeout_s=30)
        _until(lambda: _healthy(client) or proc.poll() is not None, timeout_s=60, what="server up")
        assert proc.poll() is None, proc.stdout.read()
        image = tmp_path / "frame.png"
        image.write_bytes(_png())
        # `finers-rt query` against the live server
        import argparse

        sub = argparse.ArgumentParser().add_subparsers()
        add_query_parser(sub)
        args = sub.choices["query"].parse_args(["--url", client.url, "--image", str(image), "--question", "fast",
                                                "--mask-out", str(tmp_path / "m.png")])
        args.func(args)
        assert "answer" in capsys.readouterr().out and Image.open(tmp_path / "m.png").size == (40, 30)

        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(client.segment, image, "slow", request_id="slow-1")
            busy = ("finers_worker_busy", frozenset())
            _until(lambda: parse_prometheus(client.metrics())[busy] == 1, what="slow request running")
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            try:  # after SIGTERM: refused at the socket, or 503 if it slipped in
                client.segment(image, "late")
                raise AssertionError("a request after SIGTERM was served")
            except ServiceError as e:
                assert e.status == 503 and e.error == "shutting_down"
            except urllib.error.URLError:
                pass
            body = slow.result(timeout=30)
        assert body["request_id"] == "slow-1" and body["question"] == "slow"
        assert proc.wait(timeout=30) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
