"""The micro-batcher over the real runtime (ONNX Runtime, in-process): same predictions as ``NerRuntime.predict``,
and a short request completes before a long one that was already running (windows scheduled fairly, a long
text decoded beside the worker).

No timing: the order is forced by holding the worker inside the long request's first runtime call, or the
decoder inside the long text's decoding.
"""

import threading

import pytest

from pipeline.runtime.inference import NerRuntime
from serve.batching import DECODE_ASIDE_WORDS, MicroBatcher
from serve.lanes import Lanes
from serve.windows import ServingRuntime
from tests.conftest import SPECIAL_TEXTS

pytestmark = pytest.mark.slow
LONG = ("Barack Obama visited Paris and met Angela Merkel in Berlin. " * 1700)[:100_000]


@pytest.fixture(scope="module")
def runtime(forced_onnx):
    return ServingRuntime(forced_onnx, batch_size=8)


@pytest.mark.parametrize("max_batch_tokens", [0, 1024])
def test_the_batcher_gives_the_runtimes_own_predictions(runtime, forced_onnx, max_batch_tokens):
    texts = SPECIAL_TEXTS + ["", "   ", LONG[:20_000]] + [f"tweet {i} about New York" for i in range(70)]
    expected = [p.to_dict() for p in NerRuntime(forced_onnx, batch_size=8).predict(texts)]
    batcher = MicroBatcher(runtime, max_batch_size=64, max_wait_ms=0, max_batch_tokens=max_batch_tokens)
    try:
        got = batcher.predict(texts)
    finally:
        batcher.close()
    got_dicts = [p.to_dict() for p in got.predictions]
    if not max_batch_tokens:  # whole calls of 64 windows: predict's very ONNX runs, so the very same floats
        assert got_dicts == expected
    else:  # the long text's windows ran two by two, not eight by eight: the same entities, scores to rounding
        assert [[(e["start"], e["end"], e["label"]) for e in d["entities"]] for d in got_dicts] == \
            [[(e["start"], e["end"], e["label"]) for e in d["entities"]] for d in expected]
        assert [d["score"] for d in got_dicts] == pytest.approx([d["score"] for d in expected], abs=1e-4)
    assert got.model_version == runtime.model_version


class Recording:
    """The real runtime, with the sub-tokens of each ONNX run's windows and the answered state of ``watch``
    noted at each run (the batcher runs a call as the runtime's own ONNX runs)."""

    def __init__(self, runtime: ServingRuntime) -> None:
        self.runtime, self.runs, self.watch = runtime, [], None
        self.model_version, self.batch_size = runtime.model_version, runtime.batch_size

    def plan(self, texts):
        return self.runtime.plan(texts)

    def window_tokens(self, window) -> int:
        return self.runtime.window_tokens(window)

    def run_windows(self, windows):
        self.runs.append(([self.window_tokens(w) for w in windows], self.watch is not None and self.watch.done()))
        return self.runtime.run_windows(windows)

    def finish(self, plans):
        return self.runtime.finish(plans)


def test_a_call_holds_at_most_the_token_budget_and_a_tweet_is_answered_after_its_own_onnx_run(forced_onnx):
    recording = Recording(ServingRuntime(forced_onnx, batch_size=8))
    calls: list[int] = []  # ONNX runs so far, at the end of each call
    gate, first_call = threading.Event(), threading.Event()

    def on_batch(stats):  # hold the worker after the long request's first call, until the tweet is queued
        calls.append(len(recording.runs))
        first_call.set()
        assert gate.wait(60)

    tweet = "Barack Obama in Paris"
    tweet_tokens = recording.window_tokens(recording.plan([tweet]).windows[0])
    budget = 200  # three of this test model's long-text windows (~60 sub-tokens), where 64 made one call before
    # runs within 16 sub-tokens of their shortest window: this model's tweet (~7) and long windows (~60) never share
    # one, as a real model's tweet (~30) and 512-token windows never do within the default 128
    batcher = MicroBatcher(recording, max_batch_size=64, max_wait_ms=0, max_batch_tokens=budget, on_batch=on_batch,
                           run_spread_tokens=16)
    try:
        long = batcher.submit_nowait([LONG[:20_000]])
        assert first_call.wait(120)
        short = batcher.submit_nowait([tweet])
        recording.watch = short
        gate.set()
        assert short.result(120).predictions[0].entities
        assert long.result(300).predictions[0].entities
    finally:
        gate.set()
        batcher.close()
    per_call = [recording.runs[lo:hi] for lo, hi in zip([0] + calls, calls)]
    assert len(per_call) > 5 and max(sum(sum(tokens) for tokens, _ in call) for call in per_call) <= budget
    # the tweet rode the second call, alone in its first ONNX run (the shortest window, not padded to the long
    # ones), and was answered before the long windows of that same call ran
    second = per_call[1]
    assert [tokens for tokens, _ in second][0] == [tweet_tokens] and len(second) > 1
    assert not second[0][1] and all(answered for _, answered in second[1:]), second


def answered_while_held(batcher, held: threading.Event, release: threading.Event, text: str):
    """Submit ``text``; once ``held`` says its work is held, three tweets must be answered meanwhile; then release
    it and return its result (the batcher closed either way)."""
    try:
        long = batcher.submit_nowait([text])
        assert held.wait(300)
        tweets = [batcher.submit_nowait([f"Barack Obama in Paris {i}"]) for i in range(3)]
        assert all(t.result(60).predictions[0].entities for t in tweets)
        assert not long.done()
        release.set()
        return long.result(300)
    finally:
        release.set()
        batcher.close()


def entities(prediction):
    return [(e.start, e.end, e.label) for e in prediction.entities]


class SlowDecode(Recording):
    """The real runtime whose decoding of a large plan waits until ``release`` is set (``decoding`` says it began)."""

    def __init__(self, runtime: ServingRuntime) -> None:
        super().__init__(runtime)
        self.decoding, self.release = threading.Event(), threading.Event()

    def plan_words(self, plan) -> int:
        return self.runtime.plan_words(plan)

    def finish(self, plans):
        if sum(self.plan_words(p) for p in plans) > DECODE_ASIDE_WORDS:
            self.decoding.set()
            assert self.release.wait(120)
        return self.runtime.finish(plans)


def test_a_long_text_is_decoded_aside_while_tweets_keep_being_answered(forced_onnx):
    slow = SlowDecode(ServingRuntime(forced_onnx, batch_size=8))
    text = LONG[:20_000]
    assert slow.plan_words(slow.plan([text])) > DECODE_ASIDE_WORDS
    batcher = MicroBatcher(slow, max_batch_size=64, max_wait_ms=0, max_batch_tokens=1024)
    # every window ran; the tweets are answered by the worker while the decoder thread holds the long text
    got = answered_while_held(batcher, slow.decoding, slow.release, text)
    assert entities(got.predictions[0]) == entities(NerRuntime(forced_onnx, batch_size=8).predict([text])[0])


class HeldLongRuns(Recording):
    """The real runtime whose ONNX runs of windows over ``longer_than`` sub-tokens wait until ``release`` is set."""

    def __init__(self, runtime: ServingRuntime, longer_than: int) -> None:
        super().__init__(runtime)
        self.longer_than = longer_than
        self.long_run, self.release = threading.Event(), threading.Event()

    def run_windows(self, windows):
        if max(self.window_tokens(w) for w in windows) > self.longer_than:
            self.long_run.set()
            assert self.release.wait(120)
        return self.runtime.run_windows(windows)


def test_a_tweet_runs_beside_a_long_text_whose_window_is_in_flight(forced_onnx):
    held = HeldLongRuns(ServingRuntime(forced_onnx, batch_size=8), longer_than=32)  # long windows ~60, tweet ~7
    lanes = Lanes(held, bulk_chars=10_000, max_batch_size=64, max_wait_ms=0, max_batch_tokens=1024)
    text = LONG[:20_000]
    assert lanes.lane([text]) is lanes.bulk and lanes.lane(["Barack Obama in Paris"]) is lanes.interactive
    # an ONNX run of the long text's windows is held in the bulk lane; the tweets do not queue behind it
    got = answered_while_held(lanes, held.long_run, held.release, text)
    assert entities(got.predictions[0]) == entities(NerRuntime(forced_onnx, batch_size=8).predict([text])[0])
    one_lane = Lanes(held, bulk_chars=0)
    assert one_lane.lane([text]) is one_lane.interactive
