"""Dynamic micro-batching: concurrent requests share one runtime call, on a worker thread.

Each request puts its texts on a queue and waits on a future. One worker
thread takes the first waiting request, keeps collecting requests until the
batch holds ``max_batch_size`` texts or ``max_wait_ms`` have passed since that
first request, runs ``runtime.predict`` once over all their texts (the runtime
sorts them by length into ONNX batches), and hands each request its own slice
of the results. Requests that arrive while a batch runs queue up and form the
next batch, so under load batches fill without waiting.

Waiting only pays when company is on its way. With ``arrivals`` (the server's
count of requests it has accepted but not yet handed over), the worker stops
waiting as soon as nobody is on the way: a lone client never pays the wait.

The runtime is read once per batch: swapping ``batcher.runtime`` (hot reload)
lets the batch in flight finish on the old model while the next one uses the
new. If a batch of several requests fails, each request is retried alone, so
one bad request cannot fail its neighbours; a request that fails alone gets
the exception.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Runtime(Protocol):
    model_version: str

    def predict(self, texts: list[str]) -> list[Any]: ...


@dataclass(frozen=True)
class Batched:
    """What one request gets back: its predictions and the model version that made them."""

    predictions: list[Any]
    model_version: str


@dataclass(frozen=True)
class BatchStats:
    """One runtime call, as reported to ``on_batch`` (metrics)."""

    texts: int
    requests: int
    seconds: float


class BatcherClosed(RuntimeError):
    """The batcher was closed; no new requests are taken."""


@dataclass
class _Item:
    texts: list[str]
    future: Future = field(default_factory=Future)


_STOP = object()


class MicroBatcher:
    """Groups concurrent ``submit`` calls into single ``runtime.predict`` calls."""

    def __init__(self, runtime: Runtime, *, max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 arrivals: Callable[[], int] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must not be negative, got {max_wait_ms}")
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self.arrivals = arrivals
        self.outstanding = 0  # submitted, not yet answered
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    def start(self) -> None:
        with self._lock:
            if self._closed:
                raise BatcherClosed("batcher is closed")
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="ner-batcher", daemon=True)
                self._thread.start()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop taking requests; the worker finishes everything already queued, then exits."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def submit_nowait(self, texts: list[str]) -> Future:
        """Queue ``texts``; the future resolves to a :class:`Batched`."""
        if not self.running:
            self.start()
        item = _Item(list(texts))
        with self._lock:  # no item may slip in behind _STOP
            if self._closed:
                raise BatcherClosed("batcher is closed")
            self.outstanding += 1
            self._queue.put(item)
        item.future.add_done_callback(self._answered)
        return item.future

    def _answered(self, _: Future) -> None:
        with self._lock:
            self.outstanding -= 1

    async def submit(self, texts: list[str]) -> Batched:
        """Await the predictions for ``texts`` without blocking the event loop."""
        return await asyncio.wrap_future(self.submit_nowait(texts))

    def predict(self, texts: list[str]) -> Batched:
        """Blocking form of :meth:`submit`, for threads."""
        return self.submit_nowait(texts).result()

    # -- worker ---------------------------------------------------------------

    def _work(self) -> None:
        carry: _Item | None = None
        stopping = False
        while True:
            if carry is not None:
                first, carry = carry, None
            elif stopping:
                return
            else:
                first = self._queue.get()
                if first is _STOP:
                    return
            batch, size = [first], len(first.texts)
            deadline = time.monotonic() + self.max_wait
            while size < self.max_batch_size and not stopping:
                try:  # whatever already waits joins at once; then wait out the rest of max_wait
                    item = self._queue.get_nowait()
                except queue.Empty:
                    left = deadline - time.monotonic()
                    if left <= 0 or (self.arrivals is not None and self.arrivals() <= 0):
                        break
                    try:
                        item = self._queue.get(timeout=left)
                    except queue.Empty:
                        break
                if item is _STOP:
                    stopping = True  # finish this batch (and a carried item), then exit
                elif size + len(item.texts) > self.max_batch_size:
                    carry = item  # starts the next batch
                    break
                else:
                    batch.append(item)
                    size += len(item.texts)
            self._run(batch)

    def _run(self, batch: list[_Item]) -> None:
        batch = [item for item in batch if item.future.set_running_or_notify_cancel()]
        if not batch:
            return
        runtime = self.runtime  # one model for the whole batch, even if a reload swaps it meanwhile
        texts = [text for item in batch for text in item.texts]
        start = time.perf_counter()
        try:
            predictions = runtime.predict(texts)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting requests, not swallowed
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
            else:
                log.warning("batch of %d requests failed (%s); retrying each alone", len(batch), exc)
                for item in batch:
                    self._run_alone(runtime, item)
            return
        self._report(BatchStats(len(texts), len(batch), time.perf_counter() - start))
        lo = 0
        for item in batch:
            item.future.set_result(Batched(predictions[lo:lo + len(item.texts)], runtime.model_version))
            lo += len(item.texts)

    def _run_alone(self, runtime: Runtime, item: _Item) -> None:
        start = time.perf_counter()
        try:
            predictions = runtime.predict(item.texts)
        except Exception as exc:  # noqa: BLE001
            item.future.set_exception(exc)
            return
        self._report(BatchStats(len(item.texts), 1, time.perf_counter() - start))
        item.future.set_result(Batched(predictions, runtime.model_version))

    def _report(self, stats: BatchStats) -> None:
        if self.on_batch is None:
            return
        try:
            self.on_batch(stats)
        except Exception:  # noqa: BLE001 - metrics must never fail a request
            log.exception("on_batch callback failed")
