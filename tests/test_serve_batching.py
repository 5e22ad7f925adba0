"""The micro-batcher and the model reloader in-process, with a fake runtime: grouping, routing, errors, swaps.

No sleeps and no timing: the fake runtime blocks on events, so every
interleaving below is forced, not hoped for.
"""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from serve.batching import BatcherClosed, MicroBatcher
from serve.reload import ModelReloader


class FakeRuntime:
    """Upper-cases texts; records each call; can hold a call until released; fails on texts marked 'boom'."""

    def __init__(self, version: str = "v1", hold_first: bool = False) -> None:
        self.model_version = version
        self.calls: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def predict(self, texts: list[str]) -> list[str]:
        self.calls.append(list(texts))
        self.entered.set()
        self.release.wait(30)
        if any("boom" in t for t in texts):
            raise ValueError("boom in the batch")
        return [f"{self.model_version}:{t.upper()}" for t in texts]


@pytest.fixture
def held():
    runtime = FakeRuntime(hold_first=True)
    batcher = MicroBatcher(runtime, max_batch_size=8, max_wait_ms=0)
    yield runtime, batcher
    runtime.release.set()
    batcher.close()


def test_requests_that_wait_during_a_batch_form_one_batch_and_get_their_own_results(held):
    runtime, batcher = held
    first = batcher.submit_nowait(["a"])
    assert runtime.entered.wait(30)  # the worker is inside the first batch
    waiting = [batcher.submit_nowait([f"t{i}", f"u{i}"]) for i in range(3)]
    runtime.release.set()
    assert first.result(30).predictions == ["v1:A"]
    for i, future in enumerate(waiting):
        assert future.result(30).predictions == [f"v1:T{i}", f"v1:U{i}"]
    assert runtime.calls == [["a"], ["t0", "t1", "t2", "u0", "u1", "u2"]]  # round-robin: one text each in turn


def test_batches_never_exceed_max_batch_size_and_take_the_requests_in_turn(held):
    runtime, batcher = held
    batcher.submit_nowait(["x"])
    assert runtime.entered.wait(30)
    futures = [batcher.submit_nowait([f"{i}a", f"{i}b", f"{i}c"]) for i in range(5)]  # 15 texts, max 8
    runtime.release.set()
    results = [f.result(30).predictions for f in futures]
    assert results == [[f"v1:{i}A", f"v1:{i}B", f"v1:{i}C"] for i in range(5)]
    assert runtime.calls[1:] == [["0a", "1a", "2a", "3a", "4a", "0b", "1b", "2b"],
                                 ["3b", "4b", "0c", "1c", "2c", "3c", "4c"]]


def test_the_worker_never_formats_a_request(held, monkeypatch):
    """A request's repr holds every text and emission: formatting one per request (a ValueError message from
    deque.remove did) cost 11 ms of numpy printing each, a third of the worker's time at 32 clients."""
    import serve.batching

    def no_repr(self):
        raise AssertionError("the batcher formatted a request")

    monkeypatch.setattr(serve.batching._Job, "__repr__", no_repr)
    runtime, batcher = held
    futures = [batcher.submit_nowait([f"t{i}"] * (1 + i % 3)) for i in range(20)]  # ones that finish mid-rotation
    runtime.release.set()
    for i, future in enumerate(futures):
        assert future.result(30).predictions == [f"v1:T{i}"] * (1 + i % 3)


def test_a_request_larger_than_the_batch_runs_in_several_calls_and_gets_its_results_in_order():
    runtime = FakeRuntime()
    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(runtime, max_batch_size=2, max_wait_ms=0)
        assert pool.submit(batcher.predict, list("abcde")).result(30).predictions == [f"v1:{c.upper()}" for c in "abcde"]
        batcher.close()
    assert runtime.calls == [["a", "b"], ["c", "d"], ["e"]]


def test_a_failing_request_gets_the_error_and_its_batch_neighbours_still_succeed(held):
    runtime, batcher = held
    batcher.submit_nowait(["warm"])
    assert runtime.entered.wait(30)
    good1, bad, good2 = (batcher.submit_nowait(t) for t in (["ok1"], ["boom"], ["ok2"]))
    runtime.release.set()
    assert good1.result(30).predictions == ["v1:OK1"]
    assert good2.result(30).predictions == ["v1:OK2"]
    with pytest.raises(ValueError, match="boom in the batch"):
        bad.result(30)


def test_an_error_reaches_every_waiting_request_when_each_fails():
    runtime = FakeRuntime(hold_first=True)
    batcher = MicroBatcher(runtime, max_batch_size=8, max_wait_ms=0)
    batcher.submit_nowait(["first"])
    assert runtime.entered.wait(30)
    futures = [batcher.submit_nowait([f"boom{i}"]) for i in range(3)]
    runtime.release.set()
    for future in futures:
        with pytest.raises(ValueError):
            future.result(30)
    batcher.close()


def test_swapping_the_runtime_lets_the_batch_in_flight_finish_on_the_old_one(held):
    old, batcher = held
    in_flight = batcher.submit_nowait(["during"])
    assert old.entered.wait(30)
    new = FakeRuntime("v2")
    batcher.runtime = new  # what a reload does
    queued = batcher.submit_nowait(["after"])
    old.release.set()
    assert in_flight.result(30).predictions == ["v1:DURING"] and in_flight.result().model_version == "v1"
    assert queued.result(30).predictions == ["v2:AFTER"] and queued.result().model_version == "v2"


def test_close_finishes_queued_requests_then_refuses_new_ones(held):
    runtime, batcher = held
    batcher.submit_nowait(["a"])
    assert runtime.entered.wait(30)
    queued = [batcher.submit_nowait([str(i)]) for i in range(20)]
    closer = threading.Thread(target=batcher.close)
    closer.start()
    runtime.release.set()
    closer.join(30)
    assert [f.result(0).predictions for f in queued] == [[f"v1:{i}"] for i in range(20)]
    with pytest.raises(BatcherClosed):
        batcher.submit_nowait(["late"])


def test_on_batch_reports_texts_and_requests_per_runtime_call(held):
    runtime, batcher = held
    seen = []
    batcher.on_batch = seen.append
    batcher.submit_nowait(["a"])
    assert runtime.entered.wait(30)
    futures = [batcher.submit_nowait(["b", "c"]), batcher.submit_nowait(["d"])]
    runtime.release.set()
    [f.result(30) for f in futures]
    assert [(s.texts, s.requests) for s in seen] == [(1, 1), (3, 2)]


def test_a_lone_request_does_not_wait_when_nothing_else_is_arriving():
    runtime = FakeRuntime()
    batcher = MicroBatcher(runtime, max_batch_size=8, max_wait_ms=600_000, arrivals=lambda: 0)
    assert batcher.predict(["alone"]).predictions == ["v1:ALONE"]  # a wait would block for ten minutes
    batcher.close()


def test_the_batch_waits_for_a_request_that_is_on_its_way():
    runtime = FakeRuntime()
    later: list = []

    def arrivals() -> int:  # asked only when the queue is empty: the second request arrives while it waits
        if not later:
            later.append(batcher.submit_nowait(["second"]))
            return 1
        return 0

    batcher = MicroBatcher(runtime, max_batch_size=2, max_wait_ms=600_000, arrivals=arrivals)
    first = batcher.submit_nowait(["first"])
    assert first.result(30).predictions == ["v1:FIRST"]
    assert later[0].result(30).predictions == ["v1:SECOND"]
    assert runtime.calls == [["first", "second"]]
    batcher.close()


class Holder:
    def __init__(self, runtime):
        self.runtime = runtime


def test_reloader_swaps_only_when_the_folder_changed_and_keeps_the_old_model_on_errors(tmp_path):
    info = tmp_path / "model_info.json"
    info.write_text(json.dumps({"model_version": "v1"}))

    def load(path):
        version = json.loads((path / "model_info.json").read_text())["model_version"]
        if version == "broken":
            raise ValueError("cannot load")
        return FakeRuntime(version)

    holder = Holder(load(tmp_path))
    results = []
    reloader = ModelReloader(tmp_path, load, holder, on_reload=results.append)
    assert not reloader.check().reloaded and results == []  # unchanged folder: nothing to do

    info.write_text(json.dumps({"model_version": "v2", "pad": "x"}))
    outcome = reloader.check()
    assert (outcome.reloaded, outcome.model_version, outcome.previous_version) == (True, "v2", "v1")
    assert holder.runtime.model_version == "v2"
    assert not reloader.check().reloaded

    info.write_text(json.dumps({"model_version": "broken", "pad": "xyz"}))
    outcome = reloader.check()
    assert not outcome.reloaded and "cannot load" in outcome.error
    assert holder.runtime.model_version == "v2"  # still serving the last good model
    assert [r.reloaded for r in results] == [True, False]


def test_a_short_request_sent_while_a_long_one_runs_completes_first(held):
    """Round-robin over requests: the short one waits for one window of the long one per turn, not for all."""
    runtime, batcher = held
    batcher.max_batch_size = 4
    done: list[str] = []
    long = batcher.submit_nowait([f"w{i}" for i in range(40)])  # ten runtime calls of its own
    long.add_done_callback(lambda _: done.append("long"))
    assert runtime.entered.wait(30)  # the long request's first call is running
    short = batcher.submit_nowait(["tweet"])
    short.add_done_callback(lambda _: done.append("short"))
    runtime.release.set()
    assert long.result(30).predictions == [f"v1:W{i}" for i in range(40)]
    assert short.result(30).predictions == ["v1:TWEET"]
    assert done == ["short", "long"]
    assert runtime.calls[1] == ["w4", "tweet", "w5", "w6"]  # the very next call takes the short one in
