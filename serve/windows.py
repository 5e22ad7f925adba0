"""The shared runtime, one step at a time, so the batcher can interleave the windows of many requests.

``NerRuntime.predict`` runs a list of texts from start to end: words, windows, ONNX runs sorted by length,
Viterbi. A service that ran each request that way made a one-tweet request wait behind all the windows of a
request with two 100k-character texts. :class:`ServingRuntime` splits the same steps: :meth:`plan` (texts into
windows), :meth:`run_windows` (any mix of windows from any plans, sorted by length, in ONNX runs of
``batch_size``), :meth:`finish` (Viterbi and spans for plans whose windows all ran, decoded together). A plan
run alone in chunks of a multiple of ``batch_size`` windows gives exactly ``predict``'s ONNX batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from pipeline.core.words import split_words
from pipeline.runtime.inference import EncodedWindow, NerRuntime, TextPrediction


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


class ServingRuntime(NerRuntime):
    """:class:`NerRuntime` with its steps exposed to the micro-batcher, and its arena shrinkable."""

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

    def run_windows(self, windows: list[EncodedWindow]) -> list[np.ndarray]:
        """Each window's emissions, in input order; ONNX runs of ``batch_size`` windows sorted by length."""
        order = sorted(range(len(windows)), key=lambda j: self.window_tokens(windows[j]))
        out: list[np.ndarray] = [np.empty(0)] * len(windows)
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo:lo + self.batch_size]
            for j, em in zip(idx, self._run([windows[j] for j in idx])):
                out[j] = em
        return out

    def finish(self, plans: list[Plan]) -> list[list[TextPrediction]]:
        """The predictions of plans whose windows all ran: decoded together (numpy batches), split per plan."""
        texts = [t for p in plans for t in p.texts]
        words = [w for p in plans for w in p.words]
        emissions = [em for p in plans for em in p.emissions]
        flat: list[TextPrediction] = [TextPrediction([], 1.0) if not w else None for w in words]  # type: ignore
        for idx, paths, best, probs, log_z in self._decode_batches(emissions):
            for row, i in enumerate(idx):
                flat[i] = self._prediction(texts[i], words[i], paths[row], float(best[row]), probs[row],
                                           float(log_z[row]))
        out, lo = [], 0
        for p in plans:
            out.append(flat[lo:lo + len(p.texts)])
            lo += len(p.texts)
        return out

    def shrink_arena(self) -> None:
        """Hand the CPU arena's free blocks back: after long windows ONNX Runtime keeps them otherwise."""
        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        one = np.ones((1, 1), dtype=np.int64)
        ids = np.array([[self.specials.cls]], dtype=np.int64)
        self.session.run(None, {"input_ids": ids, "attention_mask": one, "word_index": np.zeros((1, 1), np.int64),
                                "word_mask": one}, options)
