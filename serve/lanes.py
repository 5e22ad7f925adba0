"""Two micro-batchers, two lanes: large requests do not hold the cores that one-tweet requests wait for.

One 512-token window of a long text takes ~90 ms to run on 2 cores (int8, AVX2), and a tweet that arrived
while it ran waited for it when one worker ran every request's windows, however fairly it took turns. With a
bulk lane for large requests and an interactive lane for the rest, each with its own worker thread over the
same runtime, the tweet's ONNX run goes beside the long one instead of after it.

Beside each other, the two lanes' ONNX Runtime pools (a thread per core each) fought over the cores: a tweet's
p99 was 3.2x its idle p99 on 2 cores (Zen 4, int8). While both lanes run, each call now runs on a session with
half the threads (:class:`CoreShare`), so each lane has half the cores to itself; a lane alone runs on all.
With long texts decoded in a worker process (:mod:`serve.decoder`), the tokenizer letting go of the GIL on long
inputs and ``gc.freeze()`` after warm-up, the ratio is 1.43-1.94 (median of 5: 1.64; README, Serving).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from functools import partial
from typing import Any

from serve.batching import Batched, MicroBatcher
from serve.decoder import DecodeProcess


class CoreShare:
    """Which lanes are running a call: a call runs narrow (half the threads) if another lane is in a call or
    finished one within ``grace_s`` (a one-tweet client's next request is on its way; a long text's next chunk is
    being planned), wide otherwise. The first call beside another lane's wide one still shares the cores with it."""

    def __init__(self, lanes: int = 2, grace_s: float = 0.05, on_narrow: Callable[[], None] | None = None) -> None:
        self.grace_s = grace_s
        self.on_narrow = on_narrow  # called for each narrow call (metrics)
        self._lock = threading.Lock()
        self._in_call = [0] * lanes
        self._last_end = [float("-inf")] * lanes

    def busy_elsewhere(self, lane: int) -> bool:
        """Whether a lane other than ``lane`` is in a call or ended one within ``grace_s``."""
        now = time.monotonic()
        return any(n > 0 or now - end < self.grace_s
                   for i, (n, end) in enumerate(zip(self._in_call, self._last_end)) if i != lane)

    @contextmanager
    def call(self, lane: int) -> Iterator[bool]:
        """Around one runtime call of ``lane``: yields whether it should run narrow."""
        with self._lock:
            narrow = self.busy_elsewhere(lane)
            self._in_call[lane] += 1
        if narrow and self.on_narrow is not None:
            self.on_narrow()
        try:
            yield narrow
        finally:
            with self._lock:
                self._in_call[lane] -= 1
                self._last_end[lane] = time.monotonic()


class Lanes:
    """Two micro-batchers over one runtime, each with its own worker thread: requests of up to ``bulk_chars``
    characters go to the interactive lane, larger ones (long texts, Label Studio's bulk ``/predict``) to the bulk
    lane. ONNX Runtime runs the two lanes' calls at the same time (``InferenceSession.run`` is thread-safe), so a
    tweet does not wait for a long text's window that is in flight: it shares the cores with it. With
    ``bulk_chars`` 0 every request takes the interactive lane. While both lanes run, their calls run on the
    runtime's narrow session (``cores``, a :class:`CoreShare`). Has the batcher's interface for the service."""

    def __init__(self, runtime: Any, *, bulk_chars: int, on_idle: Callable[[Any], None] | None = None,
                 on_narrow: Callable[[], None] | None = None, **options: Any) -> None:
        self.bulk_chars = bulk_chars
        self.cores = CoreShare(lanes=2, on_narrow=on_narrow)
        self.decoder = DecodeProcess()  # long texts' Viterbi, away from the GIL; ended when a lane goes idle
        self._on_idle = on_idle
        self.interactive = MicroBatcher(runtime, core_share=partial(self.cores.call, 0), on_idle=self._idle,
                                        decode_aside=self.decoder.finish, **options)
        self.bulk = MicroBatcher(runtime, core_share=partial(self.cores.call, 1), on_idle=self._idle,
                                 decode_aside=self.decoder.finish, **options)
        self._lanes = (self.interactive, self.bulk)

    def lane(self, texts: list[str]) -> MicroBatcher:
        """The lane for a request of ``texts``."""
        if self.bulk_chars and sum(len(t) for t in texts) > self.bulk_chars:
            return self.bulk
        return self.interactive

    def _load_narrow(self) -> None:
        """A bulk request came: load the runtime's narrow session on a thread of its own (0.1 s, without the GIL)
        so that the first tweet beside it does not wait for the load."""
        runtime = self.runtime
        if getattr(runtime, "shares_cores", False) and not runtime.narrow_loaded:
            threading.Thread(target=runtime.narrow, name="ner-narrow-load", daemon=True).start()

    @property
    def runtime(self) -> Any:
        return self.interactive.runtime

    @runtime.setter
    def runtime(self, runtime: Any) -> None:  # a reload swaps the model of both lanes
        for lane in self._lanes:
            lane.runtime = runtime

    @property
    def arrivals(self) -> Callable[[], int] | None:
        return self.interactive.arrivals

    @arrivals.setter
    def arrivals(self, arrivals: Callable[[], int] | None) -> None:
        for lane in self._lanes:
            lane.arrivals = arrivals

    @property
    def outstanding(self) -> int:
        return sum(lane.outstanding for lane in self._lanes)

    @property
    def running(self) -> bool:
        return all(lane.running for lane in self._lanes)

    def start(self) -> None:
        for lane in self._lanes:
            lane.start()

    def close(self, timeout: float | None = 30.0) -> None:
        for lane in self._lanes:
            lane.close(timeout)
        self.decoder.close()

    def _idle(self, runtime: Any) -> None:
        """A lane is idle after a large request: end the decoding process, then ``on_idle`` (memory release)."""
        self.decoder.close()
        if self._on_idle is not None:
            self._on_idle(runtime)

    def quiet(self) -> None:
        for lane in self._lanes:
            lane.quiet()

    def submit_nowait(self, texts: list[str]) -> Future:
        lane = self.lane(texts)
        if lane is self.bulk:
            self._load_narrow()
        return lane.submit_nowait(texts)

    async def submit(self, texts: list[str]) -> Batched:
        return await asyncio.wrap_future(self.submit_nowait(texts))

    def predict(self, texts: list[str]) -> Batched:
        return self.submit_nowait(texts).result()
