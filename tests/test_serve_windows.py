"""The micro-batcher over the real runtime (ONNX Runtime, in-process): same predictions as ``NerRuntime.predict``,
and a short request completes before a long one that was already running (windows scheduled fairly).

No timing: the order is forced by holding the worker inside the long request's first runtime call.
"""

import threading

import pytest

from pipeline.runtime.inference import NerRuntime
from serve.batching import MicroBatcher
from serve.windows import ServingRuntime
from tests.conftest import SPECIAL_TEXTS

pytestmark = pytest.mark.slow
LONG = ("Barack Obama visited Paris and met Angela Merkel in Berlin. " * 1700)[:100_000]


@pytest.fixture(scope="module")
def runtime(forced_onnx):
    return ServingRuntime(forced_onnx, batch_size=8)


def test_the_batcher_gives_the_runtimes_own_predictions(runtime, forced_onnx):
    texts = SPECIAL_TEXTS + ["", "   ", LONG[:20_000]] + [f"tweet {i} about New York" for i in range(70)]
    expected = [p.to_dict() for p in NerRuntime(forced_onnx, batch_size=8).predict(texts)]
    batcher = MicroBatcher(runtime, max_batch_size=64, max_wait_ms=0)
    try:
        got = batcher.predict(texts)
    finally:
        batcher.close()
    assert [p.to_dict() for p in got.predictions] == expected
    assert got.model_version == runtime.model_version


def test_a_tweet_sent_while_two_100k_texts_are_served_completes_first(runtime):
    gate, first_call = threading.Event(), threading.Event()
    calls: list[int] = []

    def on_batch(stats):  # runs on the worker after each runtime call: hold it after the long request's first
        calls.append(stats.requests)
        first_call.set()
        assert gate.wait(60)

    batcher = MicroBatcher(runtime, max_batch_size=64, max_wait_ms=0, on_batch=on_batch)
    done: list[str] = []
    try:
        long = batcher.submit_nowait([LONG, LONG])
        long.add_done_callback(lambda _: done.append("long"))
        assert first_call.wait(120)
        short = batcher.submit_nowait(["Barack Obama in Paris"])
        short.add_done_callback(lambda _: done.append("short"))
        gate.set()
        assert short.result(120).predictions[0].entities
        assert len(long.result(300).predictions) == 2
    finally:
        gate.set()
        batcher.close()
    assert done == ["short", "long"]
    assert calls[1] == 2  # the very next runtime call served both requests
    assert len(calls) > 20  # the long request's windows took many calls: the short one did not wait for them
