"""Load test for `finers-rt serve`: N concurrent clients for T seconds against a real server process.

Usage: python bench/load.py [--engines DIR | --checkpoints DIR] --clients 8 --seconds 60 --max-queue 4
                            [--out load.json] [--sigterm-after 20]
With neither --engines nor --checkpoints, tiny random-weight checkpoints are made and exported into
a temporary folder first (~1 min). The server runs with --force-output-from-request and every
request scripts its own stage texts: request n asks for boxes that depend on n, so each 200 answer
is checked against the request that sent it (id, question, answer, every box and point).

Checks: every request got exactly one outcome; each 200 carries its own request id and its own
boxes (no cross-talk) and no id is answered twice; the server's own per-request log agrees with
what the clients received (nothing it answered was lost); the server exits 0 on SIGTERM.
--sigterm-after S: SIGTERM during the load; every request the server admitted must end 200, later
ones must be refused (503 or connection refused), and the process must exit 0.
Server-side truth is the `request <id>: <status> <outcome>` INFO line `Service.segment` logs.
"""
from __future__ import annotations

import argparse
import http.client
import io
import itertools
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from finers_rt.bench_report import git_state, hardware, timestamp, versions
from finers_rt.client import encode_multipart

IMAGE_SIZE = (960, 540)  # (W, H): exactly half of GSE's 1920x1080 space, so boxes scale exactly
SIGNAL_SLACK_S = 1.0  # a request sent this long after SIGTERM must not be served (the handler sets
# `draining` at once; the slack covers signal delivery on a loaded 2-core machine)
# `finers-rt serve` with the per-request log line on (the CLI's own logging is WARNING and up).
SERVE = ("import logging, sys\n"
         "logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')\n"
         "logging.getLogger('finers_rt.serve').setLevel(logging.INFO)\n"
         "from finers_rt.cli import main\n"
         "sys.exit(main(sys.argv[1:]))\n")
LOG_LINE = re.compile(r"finers_rt\.serve: request (\S+): (\d{3}) (\S+)$")


@dataclass
class Outcome:
    """One request as the client saw it. kind: the HTTP status ("200", "429", ...) or a transport
    failure: "refused" (connect refused), "reset" (closed without an answer), "timeout", "error"."""

    rid: str
    n: int  # global request number: the forced boxes are a function of it
    client: int
    t_send: float  # s since the load started (time.monotonic)
    t_done: float
    kind: str
    body: dict | None = None  # the JSON answer
    header_rid: str | None = None  # X-Request-ID
    retry_after: str | None = None


def expected(n: int, client: int, light: bool = False) -> tuple[dict, dict]:
    """Forced stage texts of request n and the Result fields they must produce (worked by hand).

    GSE box (1920x1080 space) [2a, 2b, 2a+200, 2b+200] -> x0.5 -> (a, b, a+100, b+100) on the
    960x540 image; region side 512 centred at (a+50, b+50), inside the image for a in [206, 653],
    b in [206, 233] -> crop (a-206, b-206, a+306, b+306), 512x512, so LPR's 512 space is crop pixels.
    light: LPR answers without a box or points, so SAM2 does not run (a third of the tiny
    engines' per-request time; the GSE box, crop and answer still differ per request).
    """
    a, b, d = 206 + (7 * n) % 448, 206 + (3 * n) % 28, n % 100
    answer = f"client {client} request {n} found it"
    gse_box = f"[{2 * a},{2 * b},{2 * a + 200},{2 * b + 200}]"
    force = {"gse": f"<answer>{{'bbox': {gse_box}, 'response': '{answer}'}}</answer>",
             "lpr": f"<answer>{{'bbox': [{10 + d},{20 + d},{60 + d},{80 + d}], "
                    f"'points_1': [{20 + d},{30 + d}], 'points_2': [{40 + d},{50 + d}]}}</answer>"}
    ox, oy = a - 206, b - 206  # crop origin
    fields = {"question": f"client {client} request {n}: the red car", "answer": answer,
              "gse_box": [a, b, a + 100, b + 100], "crop_box": [ox, oy, a + 306, b + 306],
              "lpr_box": [ox + 10 + d, oy + 20 + d, ox + 60 + d, oy + 80 + d],
              "points": [[ox + 20 + d, oy + 30 + d], [ox + 40 + d, oy + 50 + d]],
              "parse": {"gse": "ok", "lpr": "ok"}, "forced": True, "image_size": list(IMAGE_SIZE)}
    if light:
        force["lpr"] = "<answer>{'response': 'no box here'}</answer>"
        fields.update(lpr_box=None, points=[], parse={"gse": "ok", "lpr": "no_bbox"}, sam2_score=None)
    return force, fields


def frame_jpeg(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (IMAGE_SIZE[1] // 8, IMAGE_SIZE[0] // 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize(IMAGE_SIZE, Image.BILINEAR).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# ---------------------------------------------------------------- the server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_args: list[str], port: int, max_queue: int, timeout_s: float, log_path: Path):
    """`finers-rt serve` on 127.0.0.1:port in forced-output mode; stdout+stderr go to log_path."""
    cmd = [sys.executable, "-c", SERVE, "serve", *model_args, "--port", str(port), "--max-queue", str(max_queue),
           "--timeout-s", str(timeout_s), "--force-output-from-request"]
    with log_path.open("w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(port: int, proc, timeout_s: float) -> None:
    """Poll /healthz until 200; RuntimeError if the process exits or `timeout_s` passes."""
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.2)
    raise RuntimeError(f"/healthz was not 200 within {timeout_s:g} s")


def server_log(path: Path) -> dict[str, list[int]]:
    """request id -> the statuses the server logged for it (one per request it handled)."""
    out: dict[str, list[int]] = {}
    for line in path.read_text(errors="replace").splitlines():
        m = LOG_LINE.search(line)
        if m:
            out.setdefault(m.group(1), []).append(int(m.group(2)))
    return out


# ---------------------------------------------------------------- the clients


class Load:
    """Client threads, each sending one request at a time on a fresh connection until `t_end`,
    `stop`, or `max_requests` numbers have been handed out, whichever comes first."""

    def __init__(self, port: int, *, image: bytes, request_timeout_s: float, backoff_s: float, max_requests: int,
                 light: bool = False):
        self.port, self.image, self.timeout_s, self.backoff_s = port, image, request_timeout_s, backoff_s
        self.max_requests, self.light = max_requests, light
        self.numbers = itertools.count()  # next() is atomic under the GIL: one n per request
        self.stop = threading.Event()
        self.outcomes: list[Outcome] = []  # list.append is atomic
        self.t0 = self.t_end = time.monotonic()

    def run(self, clients: int, seconds: float) -> list[threading.Thread]:
        self.t0 = time.monotonic()
        self.t_end = self.t0 + seconds
        threads = [threading.Thread(target=self._client, args=(c,), daemon=True) for c in range(clients)]
        for t in threads:
            t.start()
        return threads

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _client(self, c: int) -> None:
        while not self.stop.is_set() and time.monotonic() < self.t_end:
            n = next(self.numbers)
            if n >= self.max_requests:
                return
            o = self.send(n, c)
            self.outcomes.append(o)
            if o.kind != "200":  # refused or failed: pause instead of a busy loop
                self.stop.wait(self.backoff_s)

    def send(self, n: int, c: int) -> Outcome:
        force, want = expected(n, c, self.light)
        rid = f"c{c}-n{n}"
        fields = {"question": want["question"], "return": "none", "request_id": rid, "force_output": json.dumps(force)}
        body, ctype = encode_multipart(fields, ("image", "frame.jpg", self.image))
        o = Outcome(rid, n, c, self.now(), 0.0, "error")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout_s)
        try:
            conn.request("POST", "/v1/segment", body, {"Content-Type": ctype, "Connection": "close"})
            r = conn.getresponse()
            raw = r.read()
            o.header_rid, o.retry_after = r.getheader("X-Request-ID"), r.getheader("Retry-After")
            o.body = json.loads(raw)
            o.kind = str(r.status)
        except ConnectionRefusedError:
            o.kind = "refused"
        except (ConnectionResetError, BrokenPipeError, http.client.IncompleteRead, http.client.BadStatusLine):
            o.kind = "reset"  # RemoteDisconnected is a ConnectionResetError too
        except TimeoutError:
            o.kind = "timeout"
        except (OSError, ValueError) as e:  # ValueError: an answer that is not JSON
            o.body = {"error": type(e).__name__, "detail": str(e)}
        finally:
            conn.close()
        o.t_done = self.now()
        return o


# ---------------------------------------------------------------- checks and statistics


def check(outcomes: list[Outcome], logged: dict[str, list[int]], run: dict) -> list[str]:
    """Everything that went wrong, one line each; [] for a clean run."""
    bad = [f"request numbers are not 0..{len(outcomes) - 1}: a request has no outcome or two"] \
        if sorted(o.n for o in outcomes) != list(range(len(outcomes))) else []
    ids = Counter((o.body or {}).get("request_id") for o in outcomes if o.kind == "200")
    bad += [f"request id {rid} answered {k} times" for rid, k in ids.items() if k > 1]
    for o in outcomes:
        bad += [f"{o.rid}: {p}" for p in _check_one(o, logged, run)]
    mine = {o.rid for o in outcomes}
    bad += [f"{rid}: the server logged it {len(s)} times {s}" for rid, s in logged.items() if len(s) > 1]
    # A request refused while draining gets its 503 before the form is read, so the server logs it
    # under an id of its own: unmatched 503s are fine up to the number of 503s the clients got.
    strangers = {rid: s for rid, s in logged.items() if rid not in mine}
    early_503 = [rid for rid, s in strangers.items() if s == [503]] if run["sigterm_during_load"] else []
    if len(early_503) > sum(o.kind == "503" for o in outcomes):
        bad.append(f"the server logged {len(early_503)} unmatched 503s, more than the clients got")
    bad += [f"{rid}: the server logged {s} but no client sent it" for rid, s in strangers.items()
            if rid not in early_503]
    if not ids:
        bad.append("no request was answered 200")
    if run["exit_code"] != 0:
        bad.append(f"the server exited with {run['exit_code']} after SIGTERM (None: still running, killed)")
    if run["hung_clients"]:
        bad.append(f"{run['hung_clients']} client threads did not finish")
    if run["probe_after_exit"] != "refused":
        bad.append(f"a request after the server exited got {run['probe_after_exit']}, not connection refused")
    return bad


def _check_one(o: Outcome, logged: dict[str, list[int]], run: dict) -> list[str]:
    during = run["sigterm_during_load"]
    late = o.t_send > run["t_sigterm"] + SIGNAL_SLACK_S  # sent after the drain began
    seen = logged.get(o.rid)
    if o.kind in ("refused", "reset"):  # fine only while draining, for a request the app never saw
        ok = during and o.t_done >= run["t_sigterm"] and seen is None
        return [] if ok else [f"{o.kind} at {o.t_send:.2f} s (SIGTERM at {run['t_sigterm']:.2f} s, server log {seen})"]
    if not o.kind.isdigit():
        return [f"{o.kind}: {o.body}"]
    if late and o.kind != "503":
        return [f"sent {o.t_send - run['t_sigterm']:.2f} s after SIGTERM, answered {o.kind}, not 503"]
    if o.kind == "503":
        ok = o.body.get("error") == "shutting_down" and o.t_done >= run["t_sigterm"]
        return [] if ok else [f"503 at {o.t_done:.2f} s {o.body}"]
    if seen != [int(o.kind)]:
        return [f"client got {o.kind}, the server logged {seen}"]
    if o.kind == "429":
        wait = o.retry_after or ""
        ok = o.body.get("error") == "queue_full" and o.body.get("request_id") == o.rid
        ok = ok and wait.isdigit() and int(wait) >= 1
        return [] if ok else [f"429 {o.body} Retry-After {o.retry_after}"]
    if o.kind != "200":
        return [] if o.kind == "504" and not during else [f"{o.kind} {o.body}"]
    want = expected(o.n, o.client, run["light"])[1] | {"request_id": o.rid}
    wrong = {k: o.body.get(k) for k, v in want.items() if o.body.get(k) != v}
    if o.header_rid != o.rid:
        wrong["X-Request-ID"] = o.header_rid
    return [f"cross-talk or wrong result: got {wrong}, want {({k: want.get(k) for k in wrong})}"] if wrong else []


def summarise(outcomes: list[Outcome], run: dict) -> dict:
    kinds = Counter(o.kind for o in outcomes)
    order = ["200", "429", "503", "504"] + sorted(set(kinds) - {"200", "429", "503", "504"})
    ok = [o for o in outcomes if o.kind == "200"]
    lat = np.array([(o.t_done - o.t_send) * 1e3 for o in ok] or [np.nan])
    span = max((o.t_done for o in ok), default=float("nan"))  # load start -> last 200 answer
    return {"requests": len(outcomes), "by_kind": {k: kinds.get(k, 0) for k in order},
            "throughput_rps": len(ok) / span if ok else 0.0,
            "latency_ms_200": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                               "max": float(lat.max()), "mean": float(lat.mean())},
            "in_flight_at_sigterm": sum(o.t_send < run["t_sigterm"] < o.t_done for o in ok),
            "exit_code": run["exit_code"], **{k: run[k] for k in ("t_sigterm", "t_exit", "probe_after_exit")}}


# ---------------------------------------------------------------- one load test


def build_tiny(work: Path) -> Path:
    """Tiny random-weight checkpoints exported to fp32 ONNX engines in `work`; returns the engines."""
    from finers_rt.export.engine import export_engines
    from finers_rt.export.tiny import make_tiny

    make_tiny(work / "checkpoints", seed=0, size="tiny")
    export_engines(work / "checkpoints", work / "engines", overwrite=True, progress=False)
    return work / "engines"


def load_test(*, engines: Path | None = None, checkpoints: Path | None = None, clients: int = 8,
              seconds: float = 60.0, max_queue: int = 4, sigterm_after: float | None = None,
              timeout_s: float = 120.0, backoff_s: float = 0.1, max_requests: int = 100_000, light: bool = False,
              work: Path | None = None, startup_s: float = 300.0) -> dict:
    """Run one load test; returns its report: config, environment, results, problems, ok."""
    if engines is not None and checkpoints is not None:
        raise ValueError("give --engines or --checkpoints, not both")
    if sigterm_after is not None and not 0 < sigterm_after < seconds:
        raise ValueError(f"--sigterm-after must be in (0, --seconds {seconds:g}), got {sigterm_after:g}")
    work = Path(work or tempfile.mkdtemp(prefix="finers-load-"))
    work.mkdir(parents=True, exist_ok=True)
    if engines is None and checkpoints is None:
        engines = build_tiny(work)
    model = ["--engines", str(engines)] if engines is not None else ["--checkpoints", str(checkpoints)]
    config = {"model": model, "clients": clients, "seconds": seconds, "max_queue": max_queue,
              "sigterm_after": sigterm_after, "timeout_s": timeout_s, "backoff_s": backoff_s,
              "max_requests": max_requests, "light": light, "image_size": list(IMAGE_SIZE)}
    port, log_path = free_port(), work / "server.log"
    proc = start_server(model, port, max_queue, timeout_s, log_path)
    try:
        wait_ready(port, proc, startup_s)
        load = Load(port, image=frame_jpeg(), request_timeout_s=timeout_s + 10, backoff_s=backoff_s,
                    max_requests=max_requests, light=light)
        run = _drive(load, proc, clients, seconds, sigterm_after, timeout_s) | {"light": light}
    finally:
        if proc.poll() is None:  # startup failed or the drain hung (then exit_code is None)
            proc.kill()
            proc.wait()
    results = summarise(load.outcomes, run) | {"server_log": str(log_path)}
    problems = check(load.outcomes, server_log(log_path), run)
    return {"config": config, "versions": versions(), "hardware": hardware(), **git_state(),
            "timestamp": timestamp(), "results": results, "problems": problems, "ok": not problems}


def _drive(load: Load, proc, clients: int, seconds: float, sigterm_after: float | None, timeout_s: float) -> dict:
    """Run the clients; SIGTERM the server at `sigterm_after` (else once they are done); wait for
    its exit. Every wait is bounded: at most seconds + 3 * timeout_s + 70 s in all."""
    threads = load.run(clients, seconds)
    if sigterm_after is None:
        _join(threads, load.t_end + timeout_s + 10)
    else:
        time.sleep(max(sigterm_after - load.now(), 0.0))
    t_sig = load.now()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=timeout_s + 30)  # the drain: admitted requests finish first
    except subprocess.TimeoutExpired:
        code = None
    t_exit = load.now()
    time.sleep(max(min(seconds, t_exit + 1.0) - load.now(), 0.0))  # clients meet the closed socket
    load.stop.set()
    hung = _join(threads, time.monotonic() + timeout_s + 10)
    probe = load.send(10**9, -1).kind  # one request after the exit: must be refused
    return {"t_sigterm": t_sig, "t_exit": t_exit, "exit_code": code, "hung_clients": hung,
            "probe_after_exit": probe, "sigterm_during_load": sigterm_after is not None}


def _join(threads: list[threading.Thread], deadline: float) -> int:
    """Join until `deadline` (time.monotonic); returns how many are still alive."""
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0.0))
    return sum(t.is_alive() for t in threads)


# ---------------------------------------------------------------- command line


def format_report(rep: dict) -> str:
    r, c, hw = rep["results"], rep["config"], rep["hardware"]
    lat = r["latency_ms_200"]
    sig = f", SIGTERM at {c['sigterm_after']:g} s" if c["sigterm_after"] is not None else ""
    sig += ", light (no SAM2)" if c["light"] else ""
    dirty = " (dirty)" if rep["git_dirty"] else ""
    env = f"{hw['cpu']} ({hw['cores']} cores), onnxruntime {rep['versions']['onnxruntime']}"
    rows = [f"finers-rt serve load test: {c['clients']} clients, {c['seconds']:g} s, --max-queue {c['max_queue']}{sig}",
            f"  {env}, git {str(rep['git_sha'])[:10]}{dirty}",
            f"  {'requests':<28}{r['requests']:>8}",
            *(f"    {k:<26}{v:>8}" for k, v in r["by_kind"].items()),
            f"  {'accepted req/s (200s)':<28}{r['throughput_rps']:>8.2f}",
            f"  {'latency of 200s p50 / p99':<28}{lat['p50']:>8.0f} / {lat['p99']:.0f} ms (max {lat['max']:.0f})",
            f"  {'SIGTERM / exit at':<28}{r['t_sigterm']:>8.2f} / {r['t_exit']:.2f} s, exit code {r['exit_code']}",
            f"  {'200s in flight at SIGTERM':<28}{r['in_flight_at_sigterm']:>8}",
            f"  {'request after exit':<28}{r['probe_after_exit']:>8}",
            f"  {'problems':<28}{len(rep['problems']):>8}{'' if rep['problems'] else '  (all checks passed)'}"]
    return "\n".join(rows + [f"    - {p}" for p in rep["problems"][:20]])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--engines", type=Path, help="engine folder from `finers-rt export` (ort backend)")
    src.add_argument("--checkpoints", type=Path, help="checkpoint folder (torch backend)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the load phase")
    ap.add_argument("--max-queue", type=int, default=4, help="the server's --max-queue")
    ap.add_argument("--timeout-s", type=float, default=120.0, help="the server's --timeout-s (its default too)")
    ap.add_argument("--sigterm-after", type=float, default=None, help="SIGTERM the server S s into the load")
    ap.add_argument("--backoff-s", type=float, default=0.1, help="a client's pause after a non-200 answer")
    ap.add_argument("--max-requests", type=int, default=100_000, help="cap on requests sent in all")
    ap.add_argument("--light", action="store_true", help="LPR answers without a box: SAM2 is skipped")
    ap.add_argument("--work", type=Path, default=None, help="folder for the server log (and tiny models)")
    ap.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = ap.parse_args(argv)
    rep = load_test(engines=args.engines, checkpoints=args.checkpoints, clients=args.clients, seconds=args.seconds,
                    max_queue=args.max_queue, sigterm_after=args.sigterm_after, timeout_s=args.timeout_s,
                    backoff_s=args.backoff_s, max_requests=args.max_requests, light=args.light, work=args.work)
    print(format_report(rep))
    if args.out:
        args.out.write_text(json.dumps(rep, indent=2))
        print(f"wrote {args.out}")
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
