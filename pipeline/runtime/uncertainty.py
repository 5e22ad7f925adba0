"""How sure the model is of one text, three ways, from the CRF's marginals: what active learning sorts by.

Each score is a confidence in [0, 1]: low means "show this task to an annotator first" (Label Studio sorts
tasks by their prediction's ``score``). ``predict.uncertainty`` (and ``NER_UNCERTAINTY`` for the service)
chooses which one a prediction carries; every :class:`~pipeline.runtime.inference.TextPrediction` holds all
three in ``confidence``.

- ``sequence``: P(decoded tag sequence | text), the Viterbi path's probability. Falls with the number of
  words even when every word is easy, so it favours long texts.
- ``min_entity``: the weakest single decision about an entity: the least probable predicted entity (the
  mean marginal of its tags), or the most probable missed one (1 - P(O) at a word decoded O), whichever is
  lower. Independent of length; favours texts with one doubtful span.
- ``entropy``: 1 - mean per-word entropy of the tag marginals / log(tags). Spreads the doubt over the whole
  text; favours texts that are confusing throughout.

benchmarks/uncertainty.py measures which one finds the wrongly predicted test tasks first (README).
"""

from __future__ import annotations

import math

import numpy as np

UNCERTAINTIES = ("sequence", "min_entity", "entropy")


def word_entropies(probs: np.ndarray) -> np.ndarray:
    """Entropy of each word's tag marginals, over the last axis of ``probs`` (padded words, all-zero marginals: ~0)."""
    p = np.clip(probs, 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=-1)


def confidences(path: list[int], probs: np.ndarray, sequence_prob: float, entity_scores: list[float],
                outside: int | None, entropies: np.ndarray | None = None) -> dict[str, float]:
    """The three confidences of one decoded text.

    ``path``: decoded tag ids per word; ``probs``: (words, tags) marginals; ``entity_scores``: the mean
    marginal of each predicted entity; ``outside``: the id of the ``O`` tag (None if the tag set has none);
    ``entropies``: :func:`word_entropies` of ``probs`` where the caller has them already (a whole batch's at once).
    """
    n, tags = probs.shape[0], probs.shape[1]
    if n == 0:
        return {name: 1.0 for name in UNCERTAINTIES}
    weakest = min(entity_scores, default=1.0)
    if outside is not None and outside in path:
        weakest = min(weakest, float(probs[:, outside][np.asarray(path) == outside].min()))
    mean_entropy = float((word_entropies(probs) if entropies is None else entropies[:n]).mean())
    entropy_conf = 1.0 - mean_entropy / math.log(tags) if tags > 1 else 1.0
    return {"sequence": round(sequence_prob, 6), "min_entity": round(min(max(weakest, 0.0), 1.0), 6),
            "entropy": round(min(max(entropy_conf, 0.0), 1.0), 6)}
