"""What evaluate reports beyond F1: strict figures, the entity confusion rows and the error list."""

from pipeline.core.conll import Sentence
from pipeline.core.metrics import entity_errors, score


def sentence(task_id, text, tags):
    words, pos = [], 0
    for word in text.split(" "):
        words.append((pos, pos + len(word)))
        pos += len(word) + 1
    return Sentence(task_id, text, words, tags)


def test_every_wrong_or_missed_span_is_listed_once_with_its_task_and_offsets():
    s = sentence("t9", "Obama met Angela Merkel in Paris near 北京 today",
                 ["B-PER", "O", "B-PER", "I-PER", "O", "B-LOC", "O", "B-LOC", "O"])
    pred = ["B-PER", "O", "B-PER", "O", "O", "B-ORG", "B-LOC", "O", "O"]
    confusion, errors = entity_errors([s], [pred])
    by_kind = {e["kind"]: e for e in errors}
    assert sorted(by_kind) == ["boundary", "missed", "spurious", "type"]
    assert len(errors) == 4
    assert by_kind["boundary"]["gold"]["text"] == "Angela Merkel"
    assert by_kind["boundary"]["predicted"]["text"] == "Angela"
    assert by_kind["type"]["gold"]["label"] == "LOC" and by_kind["type"]["predicted"]["label"] == "ORG"
    assert by_kind["missed"]["gold"] == {"start": 38, "end": 40, "label": "LOC", "text": "北京"}
    assert by_kind["spurious"]["predicted"]["text"] == "near" and by_kind["spurious"]["gold"] is None
    assert all(e["task_id"] == "t9" for e in errors)
    assert "[[北京]]" in by_kind["missed"]["context"]
    pairs = sorted((r["actual"], r["predicted"]) for r in confusion)
    assert pairs == sorted([("PER", "PER"), ("PER", "O"), ("LOC", "ORG"), ("LOC", "O"), ("O", "PER"),
                            ("O", "LOC")])


def test_strict_figures_drop_ill_formed_entities_that_lenient_ones_keep():
    gold = [["B-PER", "I-PER", "O"]]
    pred = [["I-PER", "I-PER", "O"]]  # lenient reads an entity; strict IOB2 does not
    result = score(gold, pred, "BIO")
    assert result["f1"] == 1.0
    assert result["strict"]["f1"] == 0.0 == result["strict_f1"]
    assert result["strict"]["per_type"]["PER"]["support"] == 1
