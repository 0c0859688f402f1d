"""bench/load.py against a real `finers-rt serve` process on the tiny engines: 429s under load, no
lost, duplicated or crossed answers, and SIGTERM during load (admitted requests end 200, exit 0).

One server run serves both load tests (a run costs ~30 s on 2 cores: start-up and warm-up ~15 s,
then the drain). Requests are `light` (LPR gives no box, so SAM2 is skipped): each 200 is still
checked field by field against the GSE box, crop and answer its own request scripted.
"""
import importlib.util
import sys
from pathlib import Path

import pytest

for _m in ("fastapi", "uvicorn", "python_multipart"):
    pytest.importorskip(_m, reason="the service needs the [serve] extra")

_spec = importlib.util.spec_from_file_location("bench_load", Path(__file__).parents[1] / "bench" / "load.py")
load = importlib.util.module_from_spec(_spec)
sys.modules["bench_load"] = load  # dataclasses look their module up by name
_spec.loader.exec_module(load)


@pytest.fixture(scope="module")
def report(tiny_engines, tmp_path_factory):
    """8 clients for 5 s against --max-queue 2; SIGTERM 3 s in, while requests are queued."""
    return load.load_test(engines=tiny_engines, clients=8, seconds=5.0, max_queue=2, sigterm_after=3.0,
                          timeout_s=120.0, light=True, work=tmp_path_factory.mktemp("load"))


def test_queue_full_gives_429s_and_no_answer_is_lost_duplicated_or_crossed(report):
    r = report["results"]
    assert report["problems"] == [], report["problems"]
    assert r["by_kind"]["429"] > 0 and r["by_kind"]["200"] > 0, r
    # A connection the server closes while it drains after SIGTERM ("reset") is allowed only for a
    # request the app never logged, after SIGTERM: `problems` above already checked each one.
    assert r["by_kind"].get("timeout", 0) == 0, r
    assert r["latency_ms_200"]["p50"] > 0 and r["throughput_rps"] > 0


def test_sigterm_during_load_answers_every_admitted_request_then_exits_0(report):
    r = report["results"]
    assert r["exit_code"] == 0
    assert r["in_flight_at_sigterm"] > 0, "SIGTERM came when nothing was admitted: the drain was not tested"
    refused_later = r["by_kind"]["503"] + r["by_kind"].get("refused", 0)
    assert refused_later > 0 and r["probe_after_exit"] == "refused", r
    assert not report["problems"]  # every admitted request ended 200 with its own result


def _outcome(n: int, kind: str = "200"):
    """Request n from client n % 8, sent at 0.1 n s, answered 1 s later; a 200 with its own result."""
    rid = f"c{n % 8}-n{n}"
    body = load.expected(n, n % 8)[1] | {"request_id": rid} if kind == "200" else None
    return load.Outcome(rid, n, n % 8, 0.1 * n, 0.1 * n + 1, kind, body=body, header_rid=rid)


def test_the_checks_catch_cross_talk_lost_answers_and_duplicates():
    run = {"t_sigterm": 10.0, "t_exit": 11.0, "exit_code": 0, "hung_clients": 0, "probe_after_exit": "refused",
           "sigterm_during_load": False, "light": False}
    good = [_outcome(n) for n in range(3)]
    logged = {o.rid: [200] for o in good}
    assert load.check(good, logged, run) == []
    crossed = _outcome(1)
    crossed.body = {**_outcome(2).body, "request_id": crossed.rid}  # request 2's boxes under id 1
    assert any("cross-talk" in p and "gse_box" in p for p in load.check([good[0], crossed, good[2]], logged, run))
    lost = _outcome(2, kind="reset")  # the server answered it 200, the client never got it
    assert any("reset" in p for p in load.check(good[:2] + [lost], logged, run))
    twice = _outcome(2)
    twice.body["request_id"] = twice.header_rid = good[1].rid
    assert any("answered 2 times" in p for p in load.check(good[:2] + [twice], logged, run))
    assert any("exited with 1" in p for p in load.check(good, logged, run | {"exit_code": 1}))
