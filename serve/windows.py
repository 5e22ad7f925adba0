"""The shared runtime, one step at a time, so the batcher can interleave the windows of many requests.

``NerRuntime.predict`` runs a list of texts from start to end: words, windows, ONNX runs sorted by length,
Viterbi. A service that ran each request that way made a one-tweet request wait behind all the windows of a
request with two 100k-character texts. :class:`ServingRuntime` splits the same steps: :meth:`plan` (texts into
windows), :meth:`run_windows` (any mix of windows from any plans, sorted by length, in ONNX runs of at most
``batch_size`` windows and ``run_tokens`` sub-tokens), :meth:`finish` (Viterbi and spans for plans whose windows
all ran, decoded together). A plan run alone in chunks of a multiple of ``batch_size`` windows gives exactly
``predict``'s ONNX batches.

While the service's two lanes both run (a tweet beside a long text's windows), each call runs on a second ONNX
Runtime session with half the threads (``run_windows(..., narrow=True)``; :class:`serve.lanes.CoreShare`
decides): each lane then has half the cores to itself instead of both pools' threads fighting over every core.
"""

from __future__ import annotations

import copy
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from pipeline.core.words import split_words
from pipeline.runtime.inference import EncodedWindow, NerRuntime, TextPrediction, session_options


@dataclass
class Plan:
    """Texts cut into words and windows (sorted by length), and the emissions their windows filled so far."""

    texts: list[str]
    words: list[list[tuple[int, int]]]
    windows: list[EncodedWindow]
    emissions: list[np.ndarray]
    remaining: int = field(init=False)

    def __post_init__(self) -> None:
        self.remaining = len(self.windows)

    def put(self, window: EncodedWindow, emissions: np.ndarray) -> None:
        """A window's emissions for the words it owns (where they are most central), as ``word_emissions``."""
        w = window.window
        self.emissions[window.text_index][w.own_lo:w.own_hi] = emissions[w.own_lo - w.lo:w.own_hi - w.lo]
        self.remaining -= 1

    def for_decoding(self) -> Plan:
        """What :meth:`ServingRuntime.finish` reads (texts, words, emissions), without the windows: what is sent
        to the decoding process (:mod:`serve.decoder`)."""
        return Plan(self.texts, self.words, [], self.emissions)


class ServingRuntime(NerRuntime):
    """:class:`NerRuntime` with its steps exposed to the micro-batcher, its arena shrinkable, and a session with
    half the threads for calls that share the cores with another lane's (loaded on first use in 0.08 s, dropped by
    :meth:`shrink_arena`: +60 MB RSS for MiniLM int8 while it is loaded)."""

    def __init__(self, model_dir: str | Path, *, threads: int = 0, spin_after_call: bool = False,
                 **options: Any) -> None:
        super().__init__(model_dir, threads=threads, spin_after_call=spin_after_call, **options)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.threads = threads or cores
        self._spin_after_call = spin_after_call
        self._narrow: ServingRuntime | None = None
        self._narrow_lock = threading.Lock()

    @property
    def shares_cores(self) -> bool:
        """Whether :meth:`run_windows` has a narrower way to run (this runtime runs more than one thread)."""
        return self.threads > 1

    @property
    def narrow_loaded(self) -> bool:
        return self._narrow is not None

    def narrow(self) -> ServingRuntime:
        """This runtime on a session with half the threads (the same graph, tokenizer and CRF): loaded once, on
        first use."""
        if not self.shares_cores:
            return self
        with self._narrow_lock:
            if self._narrow is None:
                narrow = copy.copy(self)
                narrow.threads = max(1, self.threads // 2)
                options = session_options(narrow.threads, optimized=bool(self.info.get("graph_optimized")),
                                          spin_after_call=self._spin_after_call)
                narrow.session = ort.InferenceSession(str(self.onnx_path), options,
                                                      providers=["CPUExecutionProvider"])
                self._narrow = narrow
            return self._narrow

    def decoding_state(self) -> ServingRuntime:
        """This runtime without its ONNX sessions and tokenizer: what :meth:`finish` needs (CRF, tags, batch
        size), a few kB to send to the decoding process (:mod:`serve.decoder`)."""
        state = copy.copy(self)
        state.session = state.tokenizer = state._narrow = state._narrow_lock = None  # type: ignore[assignment]
        return state

    def plan(self, texts: list[str]) -> Plan:
        words = [split_words(t) for t in texts]
        windows = self.encode([[t[s:e] for s, e in w] for t, w in zip(texts, words)])
        windows.sort(key=self.window_tokens)  # stable: the order word_emissions runs them in
        emissions = [np.zeros((len(w), len(self.tags)), dtype=np.float32) for w in words]
        return Plan(texts, words, windows, emissions)

    def plan_words(self, plan: Plan) -> int:
        """The words :meth:`finish` decodes for ``plan``: what it costs (the batcher decodes large plans aside)."""
        return sum(len(w) for w in plan.words)

    def window_tokens(self, window: EncodedWindow) -> int:
        """A window's sub-tokens: what it costs a call (the batcher's ``max_batch_tokens``) and its sort key."""
        return len(window.input_ids)

    def run_windows(self, windows: list[EncodedWindow], narrow: bool = False) -> list[np.ndarray]:
        """:meth:`NerRuntime.run_windows` (the same runs as ``predict``), on the narrow session (half the threads)
        if ``narrow``."""
        return super(ServingRuntime, self.narrow() if narrow else self).run_windows(windows)

    def finish(self, plans: list[Plan]) -> list[list[TextPrediction]]:
        """The predictions of plans whose windows all ran: decoded together (numpy batches), split per plan."""
        texts = [t for p in plans for t in p.texts]
        words = [w for p in plans for w in p.words]
        emissions = [em for p in plans for em in p.emissions]
        flat = self.decode(texts, words, emissions)
        out, lo = [], 0
        for p in plans:
            out.append(flat[lo:lo + len(p.texts)])
            lo += len(p.texts)
        return out

    def shrink_arena(self) -> None:
        """Hand the CPU arena's free blocks back: after long windows ONNX Runtime keeps them otherwise. The
        narrow session is dropped (a call still running on it keeps it until it returns)."""
        with self._narrow_lock:
            self._narrow = None
        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        one = np.ones((1, 1), dtype=np.int64)
        ids = np.array([[self.specials.cls]], dtype=np.int64)
        self.session.run(None, {"input_ids": ids, "attention_mask": one, "word_index": np.zeros((1, 1), np.int64),
                                "word_mask": one}, options)
