"""Long texts decoded in a process of their own, so that their Python loops do not hold the service's GIL.

Viterbi and the marginals of one long text are per-word Python loops over small numpy arrays: 0.37 s for a
100k-character text (18,000 words, AMD EPYC Zen 4). On the batcher's decoder thread they held the GIL in 5 ms
slices, and each step of a one-tweet request beside them (the event loop, the interactive lane's worker, ONNX
Runtime's return) waited for a slice: tweets took 20-50 ms instead of 5 while a long text was decoded. In a child
process the decoding shares only the cores.

:class:`DecodeProcess` starts one spawned, niced worker process on first use (~0.3 s, importing the runtime;
59 MB RSS; no model is loaded there: each call sends the runtime's decoding state, a few kB), and
:meth:`DecodeProcess.close` ends it when a lane goes idle after a large request (:class:`serve.lanes.Lanes`), so
its memory comes back too. If the worker dies, the plan is decoded on the calling thread instead and the next
call starts a new worker.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

log = logging.getLogger(__name__)
#: The worker's niceness: decoding is background work, the ONNX runs of one-tweet requests come first.
NICE = 10


def _lower_priority() -> None:
    """In the worker, first: niceness ``NICE`` where the OS has it."""
    if hasattr(os, "nice"):
        os.nice(NICE)


def _finish(runtime: Any, plans: list[Any]) -> list[list[Any]]:
    """In the worker: ``runtime.finish(plans)`` (a runtime without an ONNX session: ``decoding_state``)."""
    return runtime.finish(plans)


class DecodeProcess:
    """``finish(runtime, plans)`` run in one worker process, started on first use, ended by :meth:`close`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._unavailable = False  # starting a process failed for good: decode on the calling thread

    @property
    def started(self) -> bool:
        return self._pool is not None

    def finish(self, runtime: Any, plans: list[Any]) -> list[list[Any]]:
        """``runtime.finish(plans)`` in the worker (blocking: call it from a thread); on the calling thread for a
        runtime that cannot be sent (no ``decoding_state``) or when the worker is gone."""
        state = getattr(runtime, "decoding_state", None)
        if state is None or self._unavailable:
            return runtime.finish(plans)
        pool = None
        try:
            pool = self._executor()
            future = pool.submit(_finish, state(), [p.for_decoding() for p in plans])
        except BrokenProcessPool as exc:  # the worker died after the last call
            return self._here(runtime, plans, exc, pool)
        except RuntimeError as exc:  # closed meanwhile (a lane's idle release): the next call starts a new one
            return self._here(runtime, plans, exc, pool)
        except (OSError, ImportError, NotImplementedError) as exc:  # no processes or semaphores here (sandboxes)
            self._unavailable = True
            return self._here(runtime, plans, exc, pool)
        try:
            return future.result()  # an error of runtime.finish itself is the request's, as on a thread
        except BrokenProcessPool as exc:  # the worker died with this plan
            return self._here(runtime, plans, exc, pool)

    def _here(self, runtime: Any, plans: list[Any], why: Exception, pool: ProcessPoolExecutor | None
              ) -> list[list[Any]]:
        log.warning("decoding process unavailable (%s: %s); decoding on this thread%s", type(why).__name__, why,
                    " from now on" if self._unavailable else "")
        self._drop(pool)  # only the pool that failed: another call may have started a new one meanwhile
        return runtime.finish(plans)

    def close(self) -> None:
        """End the worker process (a decode in flight finishes first); the next call starts a new one."""
        pool = self._drop()
        if pool is not None:
            pool.shutdown(wait=False)

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn: a fork would copy the service's threads' locks (ONNX Runtime, the event loop) mid-use
                self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_lower_priority)
            return self._pool

    def _drop(self, pool: ProcessPoolExecutor | None = None) -> ProcessPoolExecutor | None:
        """Forget the current pool (or only ``pool``, if it is still the current one) and return it."""
        with self._lock:
            if pool is not None and self._pool is not pool:
                return None
            dropped, self._pool = self._pool, None
            return dropped
