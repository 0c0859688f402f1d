"""The service's pipeline worker (bounded queue -> executor threads, optional batching) and its
Prometheus metrics. Standard library + numpy; the asyncio side runs on the server's event loop.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .result import TIMING_KEYS

log = logging.getLogger(__name__)

STAGE_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Counters, gauges and per-stage histograms, written as Prometheus text by hand."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}  # (outcome, HTTP status) -> count
        self.stages: dict[str, list] = {}  # stage -> [bucket counts (non-cumulative), sum s, count]
        self.batches: dict[int, int] = {}  # batch size -> pipeline calls of that size

    def count(self, outcome: str, status: int) -> None:
        self.requests[outcome, status] = self.requests.get((outcome, status), 0) + 1

    def observe(self, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            h = self.stages.setdefault(stage, [[0] * len(STAGE_BUCKETS_S), 0.0, 0])
            i = next((i for i, le in enumerate(STAGE_BUCKETS_S) if ms / 1e3 <= le), None)
            if i is not None:
                h[0][i] += 1
            h[1] += ms / 1e3
            h[2] += 1

    def mean_total_s(self) -> float:
        h = self.stages.get("total")
        return h[1] / h[2] if h and h[2] else 1.0

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        out = ["# HELP finers_requests_total /v1/segment answers by outcome (error code or ok) and status.",
               "# TYPE finers_requests_total counter"]
        for (outcome, status), n in sorted(self.requests.items()):
            out.append(f'finers_requests_total{{outcome="{outcome}",status="{status}"}} {n}')
        for name, (help_, value) in gauges.items():
            out += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {value}"]
        out += ["# HELP finers_batches_total Pipeline calls by batch size (1: Pipeline.run).",
                "# TYPE finers_batches_total counter"]
        out += [f'finers_batches_total{{size="{k}"}} {n}' for k, n in sorted(self.batches.items())]
        out += ["# HELP finers_stage_seconds Pipeline stage latency (Result.timings_ms), seconds.",
                "# TYPE finers_stage_seconds histogram"]
        for stage in sorted(self.stages, key=lambda s: TIMING_KEYS.index(s) if s in TIMING_KEYS else 99):
            buckets, total, n = self.stages[stage]
            cum = np.cumsum(buckets).tolist()
            out += [f'finers_stage_seconds_bucket{{stage="{stage}",le="{le}"}} {c}' for le, c in zip(STAGE_BUCKETS_S, cum)]
            out += [f'finers_stage_seconds_bucket{{stage="{stage}",le="+Inf"}} {n}',
                    f'finers_stage_seconds_sum{{stage="{stage}"}} {total:.6f}',
                    f'finers_stage_seconds_count{{stage="{stage}"}} {n}']
        return "\n".join(out) + "\n"


@dataclass
class _Item:
    call: object  # () -> Result
    fut: asyncio.Future
    record: bool
    request: object = None  # finers_rt.batch.Request when the call may join a batch


class Worker:
    """Runs pipeline calls on `workers` threads (1: one at a time). `max_queue` calls may wait behind
    the running ones; a call whose future was cancelled (its request timed out) while waiting is skipped.

    run_batch + max_batch > 1: a consumer that takes a batchable call also takes the batchable calls
    already waiting (up to max_batch) and runs them as one `run_batch(requests)` -- it never waits
    for more to arrive, so a lone request is not delayed. If the batch raises, its requests run one
    by one so each gets its own result or error.
    """

    def __init__(self, max_queue: int, metrics: Metrics, workers: int = 1, *, run_batch=None, max_batch: int = 1):
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max_queue)  # _Item
        self.running = 0  # calls on the threads now, 0..workers
        self._metrics = metrics
        self._run_batch, self.max_batch = run_batch, max_batch if run_batch is not None else 1
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="finers-pipeline")
        self._tasks = [asyncio.create_task(self._consume()) for _ in range(workers)]

    def submit(self, call, *, record: bool = True, request=None) -> asyncio.Future:
        """Queue `call()` (raises asyncio.QueueFull); the future gets its result or exception.
        request: the call's `batch.Request`, if it may be batched with others."""
        fut = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Item(call, fut, record, request))
        return fut

    async def _consume(self):
        while True:
            items = [await self.queue.get()]
            if self.max_batch > 1 and items[0].request is not None:
                while len(items) < self.max_batch and not self.queue.empty():
                    nxt = self.queue.get_nowait()
                    items.append(nxt)
                    if nxt.request is None:  # not batchable: it runs on its own, after this batch
                        break
            try:
                live = [it for it in items if not it.fut.cancelled()]
                batch = [it for it in live if it.request is not None] if len(live) > 1 else []
                if len(batch) > 1:
                    await self._run_many(batch)
                    live = [it for it in live if it.request is None]
                for it in live:
                    await self._run_one(it)
            finally:
                for _ in items:
                    self.queue.task_done()

    async def _run_one(self, it: _Item):
        self.running += 1
        try:
            res = await asyncio.get_running_loop().run_in_executor(self._executor, it.call)
        except Exception as e:  # noqa: BLE001 - handed to the waiting request
            _deliver(it.fut, exc=e)
        else:
            self._metrics.batches[1] = self._metrics.batches.get(1, 0) + 1
            if it.record:
                self._metrics.observe(res.timings_ms)
            _deliver(it.fut, res)  # a timed-out request's result is discarded
        finally:
            self.running -= 1

    async def _run_many(self, items: list[_Item]):
        self.running += 1
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._run_batch, [it.request for it in items])
        except Exception:  # noqa: BLE001 - isolate the failing request: each runs alone
            log.info("batch of %d failed; running its requests one by one", len(items), exc_info=True)
            results = None
        finally:
            self.running -= 1
        if results is None:
            for it in items:
                await self._run_one(it)
            return
        n = len(items)
        self._metrics.batches[n] = self._metrics.batches.get(n, 0) + 1
        for it, res in zip(items, results, strict=True):
            if it.record:
                self._metrics.observe(res.timings_ms)
            _deliver(it.fut, res)

    async def close(self):
        """Finish every accepted call (timed-out running ones too), then stop the threads."""
        await self.queue.join()
        for task in self._tasks:
            task.cancel()
        await asyncio.to_thread(self._executor.shutdown, wait=True)


def _deliver(fut: asyncio.Future, res=None, *, exc: Exception | None = None) -> None:
    if fut.done():  # timed out (cancelled) meanwhile
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(res)
