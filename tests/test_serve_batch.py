"""`finers-rt serve --max-batch`: waiting requests go through `run_batch` together, each answer
reaches its own request, and a failing batch is split so only the bad request fails."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="serving needs the serve extra")
from fastapi.testclient import TestClient  # noqa: E402
from test_serve import FakePipeline, _fake_app, _png, _post, _ready, _until  # noqa: E402

from finers_rt.batch import Request  # noqa: E402


class FakeBatchPipeline(FakePipeline):
    """FakePipeline + run_batch recording each batch's questions; question "bad" fails a batch."""

    def __init__(self):
        super().__init__()
        self.batches: list[list[str]] = []

    def run(self, image, question, **kw):
        if question == "bad":
            raise ValueError("bad question")
        return super().run(image, question, **kw)

    def run_batch(self, requests: list[Request]):
        self.batches.append([r.question for r in requests])
        if any(r.question == "bad" for r in requests):
            raise ValueError("a request in this batch is bad")
        return [self.run(r.image, r.question, task=r.task, options=r.options) for r in requests]


def _fill_queue_then_release(fake, app, c, pool, questions):
    """Block the worker on a first request, queue `questions`, then let everything run."""
    fake.gate.clear()
    fake.started.clear()
    first = pool.submit(_post, c, _png(), question="first")
    assert fake.started.wait(10)
    futures = [pool.submit(_post, c, _png(), question=q, request_id=f"id-{q}") for q in questions]
    _until(lambda: app.state.service.worker.queue.qsize() == len(questions), what="requests queued")
    fake.gate.set()
    return first, futures


def test_waiting_requests_run_as_one_batch_and_each_gets_its_own_answer():
    fake = FakeBatchPipeline()
    app = _fake_app(fake, max_queue=4, max_batch=4)
    with TestClient(app) as c, ThreadPoolExecutor(5) as pool:
        _ready(c)
        first, futures = _fill_queue_then_release(fake, app, c, pool, ["a", "b", "c"])
        assert first.result().status_code == 200
        for q, f in zip("abc", futures):
            r = f.result()
            assert r.status_code == 200 and r.json()["question"] == q and r.json()["request_id"] == f"id-{q}"
        # "first" ran alone, the three waiting ones together (in arrival order, which threads decide)
        assert [sorted(b) for b in fake.batches] == [["a", "b", "c"]]
        assert 'finers_batches_total{size="3"} 1' in c.get("/metrics").text


def test_a_failing_batch_is_split_and_only_the_bad_request_fails():
    fake = FakeBatchPipeline()
    app = _fake_app(fake, max_queue=4, max_batch=4)
    with TestClient(app) as c, ThreadPoolExecutor(5) as pool:
        _ready(c)
        _, futures = _fill_queue_then_release(fake, app, c, pool, ["a", "bad", "c"])
        status = {q: f.result().status_code for q, f in zip(["a", "bad", "c"], futures)}
        assert status == {"a": 200, "bad": 422, "c": 200}
        assert [sorted(b) for b in fake.batches] == [["a", "bad", "c"]]


def test_max_batch_needs_run_batch_and_one_means_no_batching():
    with pytest.raises(ValueError, match="run_batch"):
        _fake_app(FakePipeline(), max_batch=2)
    fake = FakeBatchPipeline()
    app = _fake_app(fake, max_queue=4)  # max_batch 1: run_batch never called
    with TestClient(app) as c, ThreadPoolExecutor(5) as pool:
        _ready(c)
        _, futures = _fill_queue_then_release(fake, app, c, pool, ["a", "b"])
        assert all(f.result().status_code == 200 for f in futures) and fake.batches == []
