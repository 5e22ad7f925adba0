"""benchmarks/uncertainty.py's arithmetic on hand-made examples: what is wrong, what comes first, what counts."""

import pytest

from benchmarks.uncertainty import (
    cutoff,
    is_wrong,
    predicted_tags,
    rank_ascending,
    study,
    wrong_in_first,
)
from pipeline.core.conll import Sentence
from pipeline.runtime.inference import Entity, TextPrediction


def test_a_sentence_is_wrong_when_any_entity_differs():
    gold = ["B-person", "I-person", "O", "B-geo-loc"]
    assert not is_wrong(gold, list(gold))
    assert is_wrong(gold, ["B-person", "I-person", "O", "O"])  # missed
    assert is_wrong(gold, ["B-person", "I-person", "B-other", "B-geo-loc"])  # extra
    assert is_wrong(gold, ["B-company", "I-company", "O", "B-geo-loc"])  # other type
    assert is_wrong(gold, ["B-person", "O", "O", "B-geo-loc"])  # other boundary
    assert is_wrong(gold, ["B-person", "B-person", "O", "B-geo-loc"])  # split in two
    assert not is_wrong(["O", "O"], ["O", "O"])


def test_ranking_puts_the_doubtful_first_and_counts_ties_in_expectation():
    confidence = [0.9, 0.2, 0.7, 0.05, 0.5]
    assert rank_ascending(confidence) == [3, 1, 4, 2, 0]
    wrong = [False, True, False, True, False]
    assert wrong_in_first(confidence, wrong, 2) == 2.0
    assert wrong_in_first(confidence, wrong, 1) == 1.0
    # two tied at the cut, one of them wrong: half a wrong sentence, whatever their order in the file
    assert wrong_in_first([0.1, 0.5, 0.5, 0.9], [True, True, False, False], 2) == 1.5
    assert wrong_in_first([0.1, 0.5, 0.5, 0.9], [True, False, True, False], 2) == 1.5
    assert cutoff(221, 0.10) == 22 and cutoff(206, 0.25) == 52 and cutoff(3, 0.1) == 1 and cutoff(0, 0.1) == 0


def test_study_figures_against_random_and_perfect_order():
    wrong = [i % 4 == 0 for i in range(40)]  # 10 of 40 wrong: base rate 25%
    oracle = [0.0 if w else 1.0 for w in wrong]
    backwards = [1.0 if w else 0.0 for w in wrong]
    result = study({"oracle": oracle, "backwards": backwards}, wrong, shuffles=2000, seed=1)
    assert (result["sentences"], result["wrong"], result["base_rate"]) == (40, 10, 0.25)
    assert result["cut_sizes"] == {"10%": 4, "25%": 10}
    table = result["table"]
    assert table["oracle"]["10%"] == {"precision": 1.0, "lift": 4.0, "recall": 0.4}
    assert table["oracle"]["25%"] == table["perfect"]["25%"] == {"precision": 1.0, "lift": 4.0, "recall": 1.0}
    assert table["backwards"]["25%"]["precision"] == 0.0
    assert table["random"]["25%"]["precision"] == pytest.approx(0.25, abs=0.02)
    assert table["random"]["25%"]["precision_p05"] < 0.25 < table["random"]["25%"]["precision_p95"]


def test_predicted_entities_become_tags_on_the_sentence_words():
    sentence = Sentence("1", "Ada Lovelace met Babbage", [(0, 3), (4, 12), (13, 16), (17, 24)],
                        ["B-person", "I-person", "O", "B-person"])
    prediction = TextPrediction([Entity(0, 12, "Ada Lovelace", "person", 0.9),
                                 Entity(17, 24, "Babbage", "company", 0.4)], 0.3)
    assert predicted_tags(sentence, prediction, "BIO") == ["B-person", "I-person", "O", "B-company"]
    assert predicted_tags(sentence, prediction, "BIOES") == ["B-person", "E-person", "O", "S-company"]
    assert is_wrong(sentence.tags, predicted_tags(sentence, prediction, "BIO"))
