"""Two micro-batchers, two lanes: large requests do not hold the cores that one-tweet requests wait for.

One 512-token window of a long text takes ~90 ms to run on 2 cores (int8, AVX2), and a tweet that arrived
while it ran waited for it when one worker ran every request's windows, however fairly it took turns. With a
bulk lane for large requests and an interactive lane for the rest, each with its own worker thread over the
same runtime, the tweet's ONNX run goes beside the long one instead of after it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from serve.batching import Batched, MicroBatcher


class Lanes:
    """Two micro-batchers over one runtime, each with its own worker thread: requests of up to ``bulk_chars``
    characters go to the interactive lane, larger ones (long texts, Label Studio's bulk ``/predict``) to the bulk
    lane. ONNX Runtime runs the two lanes' calls at the same time (``InferenceSession.run`` is thread-safe), so a
    tweet does not wait for a long text's window that is in flight: it shares the cores with it. With
    ``bulk_chars`` 0 every request takes the interactive lane. Has the batcher's interface for the service."""

    def __init__(self, runtime: Any, *, bulk_chars: int, **options: Any) -> None:
        self.bulk_chars = bulk_chars
        self.interactive = MicroBatcher(runtime, **options)
        self.bulk = MicroBatcher(runtime, **options)
        self._lanes = (self.interactive, self.bulk)

    def lane(self, texts: list[str]) -> MicroBatcher:
        """The lane for a request of ``texts``."""
        if self.bulk_chars and sum(len(t) for t in texts) > self.bulk_chars:
            return self.bulk
        return self.interactive

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

    def quiet(self) -> None:
        for lane in self._lanes:
            lane.quiet()

    def submit_nowait(self, texts: list[str]) -> Future:
        return self.lane(texts).submit_nowait(texts)

    async def submit(self, texts: list[str]) -> Batched:
        return await self.lane(texts).submit(texts)

    def predict(self, texts: list[str]) -> Batched:
        return self.lane(texts).predict(texts)
