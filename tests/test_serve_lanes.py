"""The two lanes beside each other: while both run, each call runs on the runtime's narrow session (half the
ONNX Runtime threads), alone a lane runs on all of them; long texts are decoded in a worker process, with the
same predictions, and a worker that dies costs no request.

Real ONNX Runtime, a real child process; no timing: the overlap is forced by holding a call.
"""

import os
import signal
import threading

import numpy as np
import pytest

from pipeline.runtime.inference import NerRuntime
from serve.decoder import NICE, DecodeProcess
from serve.lanes import CoreShare, Lanes
from serve.windows import ServingRuntime

pytestmark = pytest.mark.slow
LONG = ("Barack Obama visited Paris and met Angela Merkel in Berlin. " * 1700)[:100_000]


def entities(prediction):
    return [(e.start, e.end, e.label) for e in prediction.entities]


def test_a_call_runs_narrow_only_while_another_lane_is_in_a_call_or_just_ended_one():
    counted = {"cores": 0, "recent": 0}  # on_narrow: once per narrow call
    cores = CoreShare(lanes=2, grace_s=0.0, on_narrow=lambda: counted.update(cores=counted["cores"] + 1))
    with cores.call(0) as narrow:
        assert not narrow  # alone
        with cores.call(1) as other:
            assert other  # beside lane 0's call
        with cores.call(0) as same_lane:
            assert not same_lane  # a lane's own calls do not count
    with cores.call(1) as narrow:
        assert not narrow  # lane 0 ended its call, no grace
    recent = CoreShare(lanes=2, grace_s=3600.0, on_narrow=lambda: counted.update(recent=counted["recent"] + 1))
    with recent.call(0):
        pass
    with recent.call(1) as narrow:
        assert narrow  # lane 0 ended a call within the grace (a tweet client's next request is on its way)
    assert counted == {"cores": 1, "recent": 1}


def test_the_narrow_session_gives_the_same_emissions_and_is_dropped_when_memory_is_released(forced_onnx):
    runtime = ServingRuntime(forced_onnx, batch_size=8, threads=2)
    plan = runtime.plan(["Barack Obama visited Paris.", LONG[:3_000]])
    assert runtime.shares_cores and not runtime.narrow_loaded
    wide = runtime.run_windows(plan.windows)
    narrow = runtime.run_windows(plan.windows, narrow=True)
    assert runtime.narrow_loaded and runtime.narrow().threads == 1
    assert runtime.narrow().session.get_session_options().intra_op_num_threads == 1
    for a, b in zip(wide, narrow):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    runtime.shrink_arena()
    assert not runtime.narrow_loaded
    one_thread = ServingRuntime(forced_onnx, batch_size=8, threads=1)
    assert not one_thread.shares_cores and one_thread.narrow() is one_thread


class HeldLongRuns:
    """The real runtime, noting whether each call ran narrow; calls over windows longer than ``longer_than``
    sub-tokens wait until ``release`` is set (``long_run`` says one began)."""

    def __init__(self, runtime: ServingRuntime, longer_than: int) -> None:
        self.runtime, self.longer_than, self.calls = runtime, longer_than, []
        self.model_version, self.batch_size, self.shares_cores = runtime.model_version, runtime.batch_size, True
        self.long_run, self.release = threading.Event(), threading.Event()

    @property
    def narrow_loaded(self) -> bool:
        return self.runtime.narrow_loaded

    def narrow(self):
        return self.runtime.narrow()

    def plan(self, texts):
        return self.runtime.plan(texts)

    def window_tokens(self, window) -> int:
        return self.runtime.window_tokens(window)

    def finish(self, plans):
        return self.runtime.finish(plans)

    def run_windows(self, windows, narrow=False):
        long = max(self.window_tokens(w) for w in windows) > self.longer_than
        self.calls.append(("long" if long else "short", narrow))
        if long:
            self.long_run.set()
            assert self.release.wait(120)
        return self.runtime.run_windows(windows, narrow=narrow)


def test_a_tweet_beside_a_long_text_in_flight_runs_narrow_and_alone_it_runs_wide(forced_onnx):
    held = HeldLongRuns(ServingRuntime(forced_onnx, batch_size=8, threads=2), longer_than=32)
    counted = []  # the service counts them in /metrics (ner_shared_core_calls_total)
    lanes = Lanes(held, bulk_chars=10_000, max_batch_size=64, max_wait_ms=0, max_batch_tokens=1024,
                  on_narrow=lambda: counted.append(1))
    lanes.cores.grace_s = 0.0  # only calls in flight count: no race with the first tweet's end
    try:
        alone = lanes.predict(["Angela Merkel in Berlin"])
        assert held.calls == [("short", False)]
        long = lanes.submit_nowait([LONG[:20_000]])
        assert held.long_run.wait(300)
        beside = lanes.predict(["Barack Obama in Paris"])
        assert held.calls[1:3] == [("long", False), ("short", True)]  # the bulk call began alone: wide
        held.release.set()
        got = long.result(300)
    finally:
        held.release.set()
        lanes.close()
    expected = NerRuntime(forced_onnx, batch_size=8).predict(["Angela Merkel in Berlin", "Barack Obama in Paris",
                                                              LONG[:20_000]])
    assert [entities(p) for p in (alone.predictions[0], beside.predictions[0], got.predictions[0])] == \
        [entities(p) for p in expected]
    assert len(counted) == sum(narrow for _, narrow in held.calls) >= 1  # one count per narrow call


def test_a_long_text_decoded_in_the_worker_process_gives_the_runtimes_predictions(forced_onnx):
    runtime = ServingRuntime(forced_onnx, batch_size=8)
    plan = runtime.plan([LONG[:20_000], "Barack Obama in Paris"])
    for window, emissions in zip(plan.windows, runtime.run_windows(plan.windows)):
        plan.put(window, emissions)
    decoder = DecodeProcess()
    try:
        got = decoder.finish(runtime, [plan])
        assert decoder.started
        assert got == runtime.finish([plan])  # the very same floats: the same numpy code on the same emissions
        pid = decoder._executor().submit(os.getpid).result(60)
        assert pid != os.getpid()
        # background work: the worker yields the cores to the tweets' ONNX runs
        assert decoder._executor().submit(os.nice, 0).result(60) == min(19, os.nice(0) + NICE)
        os.kill(pid, signal.SIGKILL)  # the worker dies: the plan is decoded here, the next call starts a new one
        assert decoder.finish(runtime, [plan]) == got
        assert decoder.finish(runtime, [plan]) == got and decoder.started
        decoder.close()
        assert not decoder.started
    finally:
        decoder.close()


def test_lanes_answer_a_long_text_decoded_aside_like_the_runtime(forced_onnx):
    lanes = Lanes(ServingRuntime(forced_onnx, batch_size=8), bulk_chars=10_000, max_batch_size=64, max_wait_ms=0,
                  max_batch_tokens=1024)
    try:
        got = lanes.predict([LONG[:30_000]])
        assert lanes.decoder.started  # more than DECODE_ASIDE_WORDS words: decoded in the worker process
    finally:
        lanes.close()
    assert not lanes.decoder.started
    assert entities(got.predictions[0]) == entities(NerRuntime(forced_onnx, batch_size=8).predict([LONG[:30_000]])[0])
