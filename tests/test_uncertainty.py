"""The three confidences that active learning sorts by: what each measures, checked by brute force."""

import itertools
import math

import numpy as np
import pytest

from pipeline.core.conll import Sentence
from pipeline.core.words import split_words
from pipeline.labelstudio.labelconfig import parse_label_config
from pipeline.labelstudio.regions import to_ls_prediction
from pipeline.runtime.inference import NerRuntime
from pipeline.runtime.uncertainty import UNCERTAINTIES, confidences
from pipeline.runtime.viterbi import CrfParams, marginals, viterbi_decode


def brute_force(emissions: np.ndarray, crf: CrfParams) -> tuple[np.ndarray, float]:
    """Exact marginals and P(best path) by enumerating every tag sequence."""
    steps, tags = emissions.shape
    scores = {}
    for seq in itertools.product(range(tags), repeat=steps):
        s = crf.start[seq[0]] + crf.end[seq[-1]] + sum(emissions[t, k] for t, k in enumerate(seq))
        s += sum(crf.transitions[a, b] for a, b in itertools.pairwise(seq))
        scores[seq] = float(s)
    log_z = np.logaddexp.reduce(list(scores.values()))
    probs = np.zeros((steps, tags))
    for seq, s in scores.items():
        for t, k in enumerate(seq):
            probs[t, k] += math.exp(s - log_z)
    return probs, math.exp(max(scores.values()) - log_z)


def test_confidences_equal_their_definitions_on_a_random_crf():
    rng = np.random.default_rng(3)
    tags = ["O", "B-x", "I-x"]
    crf = CrfParams(*(rng.normal(size=s).astype(np.float32) for s in ((3,), (3,), (3, 3))))
    emissions = rng.normal(scale=2.0, size=(1, 5, 3)).astype(np.float32)
    mask = np.ones((1, 5), dtype=bool)
    (path,), best = viterbi_decode(emissions, mask, crf)
    probs, log_z = marginals(emissions, mask, crf)
    exact_probs, exact_seq = brute_force(emissions[0], crf)
    np.testing.assert_allclose(probs[0], exact_probs, atol=1e-6)

    entity_scores = [0.9, 0.4]
    got = confidences(path, probs[0], float(np.exp(best[0] - log_z[0])), entity_scores, outside=0)
    assert got["sequence"] == pytest.approx(exact_seq, abs=1e-6)
    missed = [1 - exact_probs[t, 0] for t, k in enumerate(path) if tags[k] == "O"]
    assert got["min_entity"] == pytest.approx(min([*entity_scores, *(1 - m for m in missed)]), abs=1e-6)
    entropy = -(exact_probs * np.log(exact_probs)).sum(axis=1).mean() / math.log(3)
    assert got["entropy"] == pytest.approx(1 - entropy, abs=1e-6)


def test_a_certain_text_scores_one_and_a_coin_flip_scores_lower_on_every_measure():
    sure = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    doubt = np.array([[0.5, 0.5, 0.0], [0.4, 0.6, 0.0]])
    a = confidences([0, 1], sure, 1.0, [1.0], outside=0)
    b = confidences([0, 1], doubt, 0.3, [0.6], outside=0)
    assert a == dict.fromkeys(UNCERTAINTIES, 1.0)
    for name in UNCERTAINTIES:
        assert 0.0 <= b[name] < a[name]
    assert b["min_entity"] == 0.5  # the word decoded O is a coin flip: the likeliest missed entity


def test_predictions_carry_all_three_and_label_studio_gets_the_chosen_one(forced_onnx):
    runtime = NerRuntime(forced_onnx)
    texts = ["Alice met Bob in Paris .", "nothing here", ""]
    preds = runtime.predict(texts)
    config = parse_label_config('<View><Labels name="label" toName="text">'
                                + "".join(f'<Label value="{t}"/>' for t in runtime.entity_types)
                                + '</Labels><Text name="text" value="$text"/></View>')
    for pred in preds:
        assert set(pred.confidence) == set(UNCERTAINTIES)
        assert pred.confidence["sequence"] == pred.score
        assert all(0.0 <= v <= 1.0 for v in pred.confidence.values())
        for name in UNCERTAINTIES:
            assert to_ls_prediction(pred, config, "v1", uncertainty=name)["score"] == pred.confidence[name]
    assert any(p.entities for p in preds)
    sentences = [Sentence("t", t, split_words(t), []) for t in texts]  # as read from CoNLL
    cut = runtime.predict_words([s.text for s in sentences], [s.words for s in sentences])
    assert cut == preds  # same words, same entities and scores
