"""Dynamic micro-batching with fair scheduling: concurrent requests share runtime calls, on a worker thread.

Each request puts its texts on a queue and waits on a future. One worker
thread keeps a rotation of active requests. It plans a request's texts a chunk
at a time (words, sub-tokens, encoder windows: ``runtime.plan``), then forms
each runtime call from up to ``max_batch_size`` windows and ``max_batch_tokens``
sub-tokens taken one per request in turn (round-robin), runs them as the
runtime's own ONNX runs (sorted by length, ``runtime.batch_size`` each, never
mixing a short window with much longer ones), and after each run decodes the
plans whose windows have all run (``runtime.finish``) and answers their
requests. A request with two
100k-character texts (thousands of windows) thus takes one window per turn
like everyone else, in calls kept short by the token budget: a one-tweet
request sent meanwhile joins the very next call and is answered after its own
ONNX run in it, not after the long request's windows. A completed plan of
more than ``DECODE_ASIDE_WORDS`` words (Viterbi and spans of a long text: 0.9 s
for 100k characters) is decoded on a decoder thread while the worker goes on;
its result comes back through the queue, so request state is only ever touched
by the worker. Only the current chunk of a request is planned, so memory stays
bounded however many texts it holds.

Every request already queued joins the rotation before each call. Waiting for
more only pays when the call has room and company is on its way: with
``arrivals`` (the server's count of requests it has accepted but not yet
handed over), the worker stops waiting as soon as nobody is on the way, so a
lone client never pays ``max_wait_ms``.

A request is pinned to the runtime current when its first chunk is planned:
swapping ``batcher.runtime`` (hot reload) lets requests in flight finish on
the old model while new ones use the new. If a call over several requests'
windows fails, each request's windows are retried alone, so one bad request
cannot fail its neighbours; a request that fails alone gets the exception.
When the worker goes idle after a request of more than ``max_batch_size``
windows, ``on_idle(runtime)`` runs (``serve.memory.release_memory``).

The service runs two of these, a bulk lane and an interactive one
(:class:`serve.lanes.Lanes`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Runtime(Protocol):
    """What the batcher runs: texts planned into windows, windows run in any mix, plans decoded together
    (:class:`serve.windows.ServingRuntime`). A runtime with only ``predict(texts)`` is wrapped by
    :class:`TextsAsWindows` (each text one window)."""

    model_version: str

    def plan(self, texts: list[str]) -> Any: ...

    def run_windows(self, windows: list[Any]) -> list[Any]: ...  # ``narrow=True`` too where ``shares_cores``

    def finish(self, plans: list[Any]) -> list[list[Any]]: ...


class _TextPlan:
    """The plan of :class:`TextsAsWindows`: window i is text i."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.windows = [(self, i) for i in range(len(texts))]
        self.outputs: list[Any] = [None] * len(texts)
        self.remaining = len(texts)

    def put(self, window: tuple[_TextPlan, int], output: Any) -> None:
        self.outputs[window[1]] = output
        self.remaining -= 1


class TextsAsWindows:
    """A runtime that only has ``predict(texts)``, seen as one whose every text is one window."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.model_version: str = runtime.model_version

    def plan(self, texts: list[str]) -> _TextPlan:
        return _TextPlan(texts)

    def run_windows(self, windows: list[tuple[_TextPlan, int]]) -> list[Any]:
        return self.runtime.predict([plan.texts[i] for plan, i in windows])

    def finish(self, plans: list[_TextPlan]) -> list[list[Any]]:
        return [plan.outputs for plan in plans]


@dataclass(frozen=True)
class Batched:
    """What one request gets back: its predictions and the model version that made them."""

    predictions: list[Any]
    model_version: str


@dataclass(frozen=True)
class BatchStats:
    """One runtime call, as reported to ``on_batch`` (metrics)."""

    texts: int  # windows in the call: a text is one window unless it is longer than the encoder takes
    requests: int
    seconds: float


class BatcherClosed(RuntimeError):
    """The batcher was closed; no new requests are taken."""


@dataclass(eq=False)
class _Job:
    """One request: its texts, planned a chunk at a time; the windows of its chunks handed out in turn."""

    texts: list[str]
    future: Future = field(default_factory=Future)
    runtime: Any = None     # the (windowed) runtime of its first plan: a request never mixes two models
    planned: int = 0        # texts planned so far
    plan: Any = None        # the chunk whose windows are being handed out
    plan_lo: int = 0        # its first text's index in ``texts``
    cursor: int = 0         # next window of ``plan``
    open_plans: int = 0     # plans handed out, not yet finished
    windows: int = 0        # windows planned so far
    results: list[Any] = field(default_factory=list)
    failed: bool = False

    def __post_init__(self) -> None:
        self.results = [None] * len(self.texts)

    def __repr__(self) -> str:  # the generated one would print every text, emission and result
        return f"_Job({len(self.texts)} texts, {self.planned} planned, {self.windows} windows)"

    @property
    def done(self) -> bool:
        return not self.failed and self.planned == len(self.texts) and self.open_plans == 0


_STOP = object()
_RELEASE = object()  # from quiet(): give memory back when idle

#: A completed plan of more words than this is decoded on the decoder thread while the worker goes on running
#: other requests' windows: Viterbi, marginals and spans of a 100k-character text (~20,000 words) took 0.9 s,
#: which every tweet arriving meanwhile waited for when the worker did it.
DECODE_ASIDE_WORDS = 2_000


@dataclass(frozen=True)
class _Decoded:
    """A plan decoded on the decoder thread, handed back to the worker through the queue."""

    taken: _Taken
    future: Future


class MicroBatcher:
    """Runs the windows of concurrent ``submit`` calls in shared runtime calls, round-robin across requests."""

    def __init__(self, runtime: Any, *, max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 max_batch_tokens: int = 0, run_spread_tokens: int = 128,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 arrivals: Callable[[], int] | None = None,
                 on_idle: Callable[[Any], None] | None = None,
                 core_share: Callable[[], AbstractContextManager[bool]] | None = None,
                 decode_aside: Callable[[Any, list[Any]], list[list[Any]]] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must not be negative, got {max_wait_ms}")
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens  # sub-tokens per call (0: no bound); a call holds one window at least
        self.run_spread_tokens = run_spread_tokens  # an ONNX run's windows are within this of its shortest one
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self.arrivals = arrivals
        self.on_idle = on_idle  # called with the runtime when the worker goes idle after a large request
        self.decode_aside = decode_aside or _finish  # (runtime, plans) on the decoder thread (serve.decoder)
        self.core_share = core_share  # around each runtime call: yields whether it runs narrow (serve.lanes.CoreShare)
        self.outstanding = 0  # submitted, not yet answered
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stopping = False  # the worker saw _STOP: finish what is active, then exit
        self._wrapped: TextsAsWindows | None = None
        self._release_due = False  # quiet() was called: release when idle
        self._large = False     # a request of more than max_batch_size windows ran since the last on_idle
        self._decoder: ThreadPoolExecutor | None = None  # decodes large plans beside the worker (_finish)
        self._decoding = 0      # plans on the decoder thread, not yet handed back

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
        job = _Job(list(texts))
        with self._lock:  # no job may slip in behind _STOP
            if self._closed:
                raise BatcherClosed("batcher is closed")
            self.outstanding += 1
            self._queue.put(job)
        job.future.add_done_callback(self._answered)
        return job.future

    def quiet(self) -> None:
        """The server has no inference request in flight (their answers are sent and dropped): if a large
        request ran, the worker calls ``on_idle`` as soon as it is idle."""
        if self._large and self.on_idle is not None:
            self._queue.put(_RELEASE)

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
        active: deque[_Job] = deque()  # requests with windows still to hand out, in round-robin order
        try:
            while True:
                if not active and not self._wait(active):
                    return
                if not active:
                    continue
                self._gather(active)
                self._run(self._take(active), active)  # no local keeps the last call's requests alive when idle
        finally:
            if self._decoder is not None:
                self._decoder.shutdown(wait=False)

    def _wait(self, active: deque[_Job]) -> bool:
        """Idle: release memory if due, then block for the next item; False once the batcher stops (after the
        plans still on the decoder thread came back)."""
        if self._stopping and not self._decoding:
            return False
        if self._release_due:
            self._idle()
        self._handle(self._queue.get(), active)
        return not (self._stopping and not self._decoding)

    def _handle(self, item: Any, active: deque[_Job]) -> None:
        if item is _STOP:
            self._stopping = True  # finish the active requests, then exit
        elif item is _RELEASE:
            self._release_due = True
        elif isinstance(item, _Decoded):
            self._decoded(item)
        else:
            self._admit(item, active)

    def _windowed(self) -> Any:
        """The current runtime, wrapped once if it only has ``predict``."""
        runtime = self.runtime
        if hasattr(runtime, "plan"):
            return runtime
        if self._wrapped is None or self._wrapped.runtime is not runtime:
            self._wrapped = TextsAsWindows(runtime)
        return self._wrapped

    def _admit(self, job: _Job, active: deque[_Job]) -> None:
        if job.future.set_running_or_notify_cancel():
            active.append(job)

    def _gather(self, active: deque[_Job]) -> None:
        """Every request already waiting joins the rotation; then, while the batch has room, wait out
        ``max_wait`` for requests that are on their way."""
        deadline = time.monotonic() + self.max_wait
        while not self._stopping:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if (left <= 0 or self._ready_windows(active) >= self.max_batch_size
                        or (self.arrivals is not None and self.arrivals() <= 0)):
                    return
                try:
                    item = self._queue.get(timeout=left)
                except queue.Empty:
                    return
            self._handle(item, active)

    def _ready_windows(self, active: deque[_Job]) -> int:
        """Windows the active requests could hand out now (a request not planned yet counts its texts)."""
        total = 0
        for job in active:
            total += len(job.texts) - job.planned
            if job.plan is not None:
                total += len(job.plan.windows) - job.cursor
            if total >= self.max_batch_size:
                break
        return total

    def _take(self, active: deque[_Job]) -> list[_Taken]:
        """Up to ``max_batch_size`` windows and ``max_batch_tokens`` sub-tokens (one window at least), one per
        request in turn (round-robin): a short request waits for at most one window of each other request per
        turn, never for all of a long one's windows."""
        taken: list[_Taken] = []
        tokens = 0
        while active and len(taken) < self.max_batch_size:
            job = active.popleft()
            window = self._next_window(job)
            if window is None:
                if job.done:  # its last chunk held texts without words only: nothing left to run
                    self._complete(job)
                continue
            cost = _window_tokens(job.runtime, window)
            if taken and self.max_batch_tokens and tokens + cost > self.max_batch_tokens:
                job.cursor -= 1  # the window waits for the next call, its request first in turn
                active.appendleft(job)
                break
            tokens += cost
            taken.append(_Taken(job, job.plan, job.plan_lo, window))
            active.append(job)
        return taken

    def _next_window(self, job: _Job) -> Any:
        """The request's next window, planning its next chunk of texts when the current one is handed out."""
        while job.plan is None or job.cursor == len(job.plan.windows):
            if job.failed or job.planned == len(job.texts):
                return None
            lo, chunk = job.planned, _chunk(job.texts, job.planned, self.max_batch_size)
            try:
                if job.runtime is None:  # one model for the whole request, even if a reload swaps it meanwhile
                    job.runtime = self._windowed()
                plan = job.runtime.plan(chunk)
            except Exception as exc:  # noqa: BLE001 - the request gets it; its neighbours go on
                self._fail(job, exc)
                return None
            job.planned += len(chunk)
            job.windows += len(plan.windows)
            job.open_plans += 1
            if plan.windows:
                job.plan, job.plan_lo, job.cursor = plan, lo, 0
            else:  # texts without words only: decoded at once
                self._finish(job.runtime, [_Taken(job, plan, lo, None)])
        window = job.plan.windows[job.cursor]
        job.cursor += 1
        return window

    def _run(self, taken: list[_Taken], active: deque[_Job]) -> None:
        """One runtime call per model over the taken windows; then the plans they completed are decoded."""
        for runtime, group in _by_runtime(taken):
            start = time.perf_counter()
            for part in _onnx_runs(runtime, group, self.run_spread_tokens):  # shortest windows first
                self._run_group(runtime, part)
                self._finish_completed(runtime, part)
            self._report(BatchStats(len(group), len({id(t.job) for t in group}), time.perf_counter() - start))
        for job in {id(t.job): t.job for t in taken}.values():
            if job.done:
                self._complete(job)
            if job.failed or job.future.done():
                _discard(active, job)

    def _finish_completed(self, runtime: Any, part: list[_Taken]) -> None:
        """Decode the plans whose last window just ran and answer their requests now, not after the whole call:
        a tweet that shares a call with long windows is answered once its own ONNX run is done."""
        completed, seen = [], set()
        for t in part:
            if not t.job.failed and t.plan.remaining == 0 and id(t.plan) not in seen:
                seen.add(id(t.plan))
                completed.append(t)
        if completed:
            self._finish(runtime, completed)
        for t in completed:
            if t.job.done:
                self._complete(t.job)

    def _run_group(self, runtime: Any, group: list[_Taken]) -> None:
        """Emissions into each window's plan; if the call fails, each request's windows again alone."""
        try:
            outputs = self._run_windows(runtime, [t.window for t in group])
        except Exception as exc:  # noqa: BLE001 - handed to the waiting requests, not swallowed
            jobs = {id(t.job): t.job for t in group}
            if len(jobs) == 1:
                self._fail(group[0].job, exc)
                return
            log.warning("batch of %d requests failed (%s); retrying each alone", len(jobs), exc)
            for job in jobs.values():
                self._run_group(runtime, [t for t in group if t.job is job])
            return
        for t, output in zip(group, outputs):
            t.plan.put(t.window, output)

    def _run_windows(self, runtime: Any, windows: list[Any]) -> list[Any]:
        """``runtime.run_windows``, on its narrow session (half the threads) where ``core_share`` says the cores
        are shared with another lane's calls."""
        if self.core_share is None or not getattr(runtime, "shares_cores", False):
            return runtime.run_windows(windows)
        with self.core_share() as narrow:
            return runtime.run_windows(windows, narrow=True) if narrow else runtime.run_windows(windows)

    def _finish(self, runtime: Any, completed: list[_Taken]) -> None:
        """Decode the completed plans: large ones on the decoder thread (the worker goes on), the rest together
        here; a failure is retried plan by plan and fails only its request."""
        here = []
        for t in completed:
            if _plan_words(runtime, t.plan) > DECODE_ASIDE_WORDS:
                self._decode_aside(runtime, t)
            else:
                here.append(t)
        if not here:
            return
        try:
            outs = runtime.finish([t.plan for t in here])
        except Exception as exc:  # noqa: BLE001
            if len(here) == 1:
                self._fail(here[0].job, exc)
                return
            for t in here:
                self._finish(runtime, [t])
            return
        for t, predictions in zip(here, outs):
            self._store(t, predictions)

    def _store(self, t: _Taken, predictions: list[Any]) -> None:
        t.job.results[t.lo:t.lo + len(predictions)] = predictions
        t.job.open_plans -= 1

    def _decode_aside(self, runtime: Any, t: _Taken) -> None:
        """``runtime.finish([plan])`` on the decoder thread; its result comes back through the queue, and the
        worker stores it (:meth:`_decoded`): request state is only ever touched by the worker."""
        if self._decoder is None:
            self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ner-decoder")
        self._decoding += 1
        future = self._decoder.submit(self.decode_aside, runtime, [t.plan])
        future.add_done_callback(lambda done: self._queue.put(_Decoded(t, done)))

    def _decoded(self, item: _Decoded) -> None:
        self._decoding -= 1
        job = item.taken.job
        try:
            [predictions] = item.future.result()
        except Exception as exc:  # noqa: BLE001 - the request gets it
            self._fail(job, exc)
            return
        if not job.failed:
            self._store(item.taken, predictions)
            if job.done:
                self._complete(job)

    def _complete(self, job: _Job) -> None:
        self._large = self._large or job.windows > self.max_batch_size
        if not job.future.done():
            job.future.set_result(Batched(job.results, job.runtime.model_version if job.runtime else
                                          self.runtime.model_version))

    def _fail(self, job: _Job, exc: Exception) -> None:
        job.failed = True
        self._large = self._large or job.windows > self.max_batch_size
        if not job.future.done():
            job.future.set_exception(exc)

    def _idle(self) -> None:
        """Idle after a large request, with nothing in flight in the server: give memory back (``on_idle``)."""
        self._release_due = False
        if self._large and self.on_idle is not None:
            self._large = False
            try:
                self.on_idle(self.runtime)
            except Exception:  # noqa: BLE001 - releasing memory must never stop the worker
                log.exception("on_idle callback failed")

    def _report(self, stats: BatchStats) -> None:
        if self.on_batch is None:
            return
        try:
            self.on_batch(stats)
        except Exception:  # noqa: BLE001 - metrics must never fail a request
            log.exception("on_batch callback failed")


@dataclass(frozen=True)
class _Taken:
    """One window handed out: its request, its plan, the plan's first text in the request, the window."""

    job: _Job
    plan: Any
    lo: int
    window: Any


#: A request's texts are planned (words, sub-tokens, windows) in chunks of about this many characters: planning a
#: 100k-character text takes a quarter of a second on the worker thread, so long texts are planned one at a time.
CHUNK_CHARS = 10_000


def _chunk(texts: list[str], lo: int, max_texts: int) -> list[str]:
    """The next texts to plan from ``lo``: at most ``max_texts``, stopping after ``CHUNK_CHARS`` characters."""
    hi, chars = lo, 0
    while hi < len(texts) and hi - lo < max_texts and chars < CHUNK_CHARS:
        chars += len(texts[hi])
        hi += 1
    return texts[lo:hi]


def _by_runtime(taken: list[_Taken]) -> list[tuple[Any, list[_Taken]]]:
    """The taken windows grouped by the runtime of their request (two only while a reload is under way)."""
    groups: dict[int, tuple[Any, list[_Taken]]] = {}
    for t in taken:
        groups.setdefault(id(t.job.runtime), (t.job.runtime, []))[1].append(t)
    return list(groups.values())


def _finish(runtime: Any, plans: list[Any]) -> list[list[Any]]:
    return runtime.finish(plans)


def _plan_words(runtime: Any, plan: Any) -> int:
    """The words a plan decodes (0 for a runtime that does not say: decoded on the worker)."""
    words = getattr(runtime, "plan_words", None)
    return words(plan) if words is not None else 0


def _window_tokens(runtime: Any, window: Any) -> int:
    """What a window costs a call, in sub-tokens (0 for a runtime that does not say)."""
    tokens = getattr(runtime, "window_tokens", None)
    return tokens(window) if tokens is not None else 0


def _onnx_runs(runtime: Any, group: list[_Taken], spread: int) -> list[list[_Taken]]:
    """The call's windows in ONNX runs, sorted by length: ``batch_size`` each (the runtime's own runs) and within
    ``spread`` sub-tokens of the run's shortest window, so each run's requests are answered as soon as it is done
    and a tweet never rides in a run padded to a long text's 512-token windows (17x its own cost); tweets, whose
    lengths differ by less, keep sharing runs. A runtime without ``batch_size`` and ``window_tokens``: one run."""
    size = getattr(runtime, "batch_size", None)
    if not size or getattr(runtime, "window_tokens", None) is None:
        return [group]
    runs: list[list[_Taken]] = []
    shortest = 0
    for t in sorted(group, key=lambda t: runtime.window_tokens(t.window)):
        tokens = runtime.window_tokens(t.window)
        if not runs or len(runs[-1]) == size or tokens - shortest > spread:
            runs.append([])
            shortest = tokens
        runs[-1].append(t)
    return runs


def _discard(active: deque[_Job], job: _Job) -> None:
    # Not remove() in a try: a job already out of the rotation made it raise ValueError("<repr> is not in
    # deque"), and the repr of a job holds its emissions: 11 ms of numpy printing per request, a third of the
    # worker's time at 32 clients.
    if job in active:
        active.remove(job)

