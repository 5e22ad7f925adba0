"""CRF decoding in numpy, equal to ``torchcrf.CRF.decode``, plus marginals for scores.

Vectorized over the batch and the tags; the only Python loop is over time
steps. Masks are right-padded (every sequence starts at step 0), as ours are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CrfParams:
    start: np.ndarray        # (tags,)
    end: np.ndarray          # (tags,)
    transitions: np.ndarray  # (tags, tags): score of moving from tag i to tag j

    @classmethod
    def from_dict(cls, data: dict) -> CrfParams:
        return cls(np.asarray(data["start_transitions"], dtype=np.float32),
                   np.asarray(data["end_transitions"], dtype=np.float32),
                   np.asarray(data["transitions"], dtype=np.float32))


def viterbi_decode(emissions: np.ndarray, mask: np.ndarray, crf: CrfParams) -> tuple[list[list[int]], np.ndarray]:
    """Best tag path per sequence and its unnormalized score.

    ``emissions``: (batch, steps, tags); ``mask``: (batch, steps), 1 for real
    steps. Ties break like torchcrf (first maximum).
    """
    emissions = emissions.astype(np.float32, copy=False)
    mask = mask.astype(bool)
    batch, steps, tags = emissions.shape
    trans = crf.transitions  # (from, to)
    every_row_real = mask.all(axis=0)
    score = crf.start[None, :] + emissions[:, 0]
    before = np.empty((steps, batch, tags), dtype=np.float32)  # before[t]: the scores that step t + 1 extends
    for t in range(1, steps):
        before[t - 1] = score
        # candidates as (from, batch, to), laid out in that order: the max over the first axis is element-wise
        # over contiguous slabs, 5x faster in numpy than a max and argmax over a short middle axis
        best = np.add(score.T[:, :, None], trans[:, None, :], order="C").max(axis=0)
        best += emissions[:, t]
        score = best if every_row_real[t] else np.where(mask[:, t, None], best, score)
    score = score + crf.end[None, :]
    lengths = mask.sum(axis=1)
    tag = score.argmax(axis=1)
    path_tags = np.empty((batch, steps), dtype=np.int64)
    if steps:
        path_tags[:, steps - 1] = tag
    for t in range(steps - 2, -1, -1):
        # the back-pointer of each row's own tag only: the same float32 sums as the forward pass's candidates,
        # so the same first maximum; a row moves only once t is before its last step
        previous = (before[t] + trans[:, tag].T).argmax(axis=1)
        tag = previous if every_row_real[t + 1] else np.where(t < lengths - 1, previous, tag)
        path_tags[:, t] = tag
    paths = [row[:n].tolist() for row, n in zip(path_tags, lengths.tolist())]
    return paths, score.max(axis=1)


def marginals(emissions: np.ndarray, mask: np.ndarray, crf: CrfParams) -> tuple[np.ndarray, np.ndarray]:
    """Per-step tag marginals P(tag_t = k | x) and the log partition function.

    Scaled forward-backward (Rabiner): probabilities instead of logs, each step
    renormalized and its scale kept in log space, float64. One small matrix
    product per step instead of a log-sum-exp over (tags x tags), 4-5x faster
    on a batch, with the same results (tested against brute force and 20,000-step
    sequences). Scores are shifted by their maxima before ``exp``, so nothing
    overflows; forbidden transitions (-1e4) become exact zeros. Padded steps get
    marginals of 0.
    """
    e = emissions.astype(np.float64)
    m = mask.astype(bool)
    batch, steps, tags = e.shape
    e_max = e.max(axis=2)
    scaled_e = np.exp(e - e_max[:, :, None])
    t_max = float(crf.transitions.max())
    trans = np.exp(crf.transitions.astype(np.float64) - t_max)
    start_max, end_max = float(crf.start.max()), float(crf.end.max())
    end = np.exp(crf.end.astype(np.float64) - end_max)
    every_row_real = m.all(axis=0)

    alpha = np.empty((batch, steps, tags))
    norms = np.ones((batch, steps))
    a = np.exp(crf.start.astype(np.float64) - start_max)[None, :] * scaled_e[:, 0]
    norms[:, 0] = a.sum(axis=1)
    alpha[:, 0] = a / norms[:, 0, None]
    for t in range(1, steps):
        a = (alpha[:, t - 1] @ trans) * scaled_e[:, t]
        c = a.sum(axis=1)
        if every_row_real[t]:
            np.divide(a, c[:, None], out=alpha[:, t])
            norms[:, t] = c
        else:  # finished rows carry their last alpha forward and add no scale
            real = m[:, t]
            norms[:, t] = np.where(real, c, 1.0)
            alpha[:, t] = np.where(real[:, None], a / norms[:, t, None], alpha[:, t - 1])
    lengths = m.sum(axis=1)
    last = np.maximum(lengths - 1, 0)
    log_scale = start_max + np.where(m, np.log(norms) + e_max, 0.0).sum(axis=1) + t_max * (lengths - 1)
    log_z = log_scale + np.log((alpha[np.arange(batch), last] * end[None, :]).sum(axis=1)) + end_max

    beta = np.empty((batch, steps, tags))
    beta[:, steps - 1] = end[None, :]
    ends_at = np.zeros((batch, steps), dtype=bool)
    ends_at[np.arange(batch), last] = True
    some_row_ends = ends_at.any(axis=0)
    for t in range(steps - 2, -1, -1):
        b = (scaled_e[:, t + 1] * beta[:, t + 1]) @ trans.T
        b /= b.sum(axis=1, keepdims=True)
        if every_row_real[t + 1]:
            beta[:, t] = b
        else:
            beta[:, t] = np.where(m[:, t + 1, None], b, beta[:, t + 1])
        if some_row_ends[t]:
            beta[:, t] = np.where(ends_at[:, t, None], end[None, :], beta[:, t])
    probs = alpha * beta
    probs /= np.maximum(probs.sum(axis=2, keepdims=True), 1e-300)
    probs[~m] = 0.0
    return probs, log_z
