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
    batch, steps, _ = emissions.shape
    score = crf.start[None, :] + emissions[:, 0]
    history = np.zeros((max(steps - 1, 0), batch, emissions.shape[2]), dtype=np.int64)
    for t in range(1, steps):
        candidates = score[:, :, None] + crf.transitions[None, :, :]
        best_prev = candidates.argmax(axis=1)
        next_score = candidates.max(axis=1) + emissions[:, t]
        history[t - 1] = best_prev
        score = np.where(mask[:, t, None], next_score, score)
    score = score + crf.end[None, :]
    lengths = mask.sum(axis=1)
    best_last = score.argmax(axis=1)
    paths = []
    for b in range(batch):
        n = int(lengths[b])
        tag = int(best_last[b])
        path = [tag]
        for t in range(n - 2, -1, -1):
            tag = int(history[t, b, tag])
            path.append(tag)
        path.reverse()
        paths.append(path)
    return paths, score.max(axis=1)


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    peak = x.max(axis=axis, keepdims=True)
    return np.squeeze(peak, axis=axis) + np.log(np.exp(x - peak).sum(axis=axis))


def marginals(emissions: np.ndarray, mask: np.ndarray, crf: CrfParams) -> tuple[np.ndarray, np.ndarray]:
    """Per-step tag marginals P(tag_t = k | x) and the log partition function.

    Forward-backward in log space, float64 so long texts do not lose mass.
    Padded steps get marginals of 0.
    """
    e = emissions.astype(np.float64)
    m = mask.astype(bool)
    trans = crf.transitions.astype(np.float64)
    batch, steps, tags = e.shape
    alpha = np.empty((batch, steps, tags))
    alpha[:, 0] = crf.start[None, :] + e[:, 0]
    for t in range(1, steps):
        nxt = _logsumexp(alpha[:, t - 1, :, None] + trans[None], axis=1) + e[:, t]
        alpha[:, t] = np.where(m[:, t, None], nxt, alpha[:, t - 1])
    lengths = m.sum(axis=1)
    beta = np.empty((batch, steps, tags))
    beta[:, steps - 1] = crf.end[None, :]
    for t in range(steps - 2, -1, -1):
        nxt = _logsumexp(trans[None] + (e[:, t + 1] + beta[:, t + 1])[:, None, :], axis=2)
        is_last = (t == lengths - 1)[:, None]
        real_next = m[:, t + 1, None]
        beta[:, t] = np.where(is_last, crf.end[None, :], np.where(real_next, nxt, beta[:, t + 1]))
    log_z = _logsumexp(alpha[np.arange(batch), np.maximum(lengths - 1, 0)] + crf.end[None, :], axis=1)
    probs = np.exp(alpha + beta - log_z[:, None, None])
    probs[~m] = 0.0
    return probs, log_z
