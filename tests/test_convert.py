import json
import unicodedata
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.conll import read_conll, write_conll
from pipeline.convert import convert_tasks, run, split_of
from pipeline.errors import ConversionError
from pipeline.labelconfig import parse_label_config
from pipeline.tags import tags_to_spans
from pipeline.words import split_words

CONFIG_XML = """<View>
  <Labels name="label" toName="text">
    <Label value="PER"/><Label value="LOC"/><Label value="ORG"/>
  </Labels>
  <Text name="text" value="$text"/>
</View>"""
CONFIG = parse_label_config(CONFIG_XML)


def region(start, end, label, text, *, item_type="labels"):
    return {"from_name": "label", "to_name": "text", "type": item_type,
            "value": {"start": start, "end": end, "text": text, "labels": [label]}}


def task(task_id, text, *regions, cancelled=False, extra_annotations=()):
    annotations = [{"id": task_id * 10, "result": list(regions), "was_cancelled": cancelled,
                    "ground_truth": False, "completed_by": 1, "updated_at": "2026-01-01T00:00:00Z"}]
    return {"id": task_id, "data": {"text": text}, "annotations": annotations + list(extra_annotations)}


def only_sentence(splits):
    sentences = [s for group in splits.values() for s in group]
    assert len(sentences) == 1
    return sentences[0]


def entities(sentence):
    """(text, label) of each entity, read back through the offsets."""
    out, current = [], None
    for (s, e), tag in zip(sentence.words, sentence.tags):
        if tag.startswith("B-"):
            current = [s, e, tag[2:]]
            out.append(current)
        elif tag.startswith("I-"):
            current[1] = e
    return [(sentence.text[s:e], label) for s, e, label in out]


def test_chinese_text_is_tagged_per_character_with_exact_offsets():
    text = "我爱北京天安门。"
    splits, _ = convert_tasks([task(1, text, region(2, 4, "LOC", "北京"), region(4, 7, "LOC", "天安门"))], CONFIG)
    sentence = only_sentence(splits)
    assert sentence.tokens == list(text)
    assert sentence.tags == ["O", "O", "B-LOC", "I-LOC", "B-LOC", "I-LOC", "I-LOC", "O"]
    assert entities(sentence) == [("北京", "LOC"), ("天安门", "LOC")]


def test_emoji_before_a_span_keeps_code_point_offsets():
    text = "😀😀 Barack Obama 👍 in Paris"
    start = text.index("Barack")
    splits, report = convert_tasks([task(1, text, region(start, start + 12, "PER", "Barack Obama"),
                                         region(text.index("Paris"), len(text), "LOC", "Paris"))], CONFIG)
    assert entities(only_sentence(splits)) == [("Barack Obama", "PER"), ("Paris", "LOC")]
    assert report.spans == []


def test_utf16_offsets_are_repaired_and_reported():
    text = "😀😀 Obama"
    # a UTF-16 based tool counts each emoji as two units: Obama at 5..10, not 3..8
    splits, report = convert_tasks([task(7, text, region(5, 10, "PER", "Obama"))], CONFIG)
    assert entities(only_sentence(splits)) == [("Obama", "PER")]
    assert [(s["task_id"], s["reason"], s["new_start"]) for s in report.spans] == [(7, "utf16_offsets", 3)]


def test_span_whitespace_is_trimmed_and_counted():
    text = "met  Obama  today"
    splits, report = convert_tasks([task(1, text, region(3, 12, "PER", "  Obama  "))], CONFIG)
    assert entities(only_sentence(splits)) == [("Obama", "PER")]
    assert report.counts["spans_changed:trimmed_whitespace"] == 1


def test_partial_word_annotation_splits_the_word():
    text = "#Obama2024 rocks"
    splits, _ = convert_tasks([task(1, text, region(1, 6, "PER", "Obama"))], CONFIG)
    sentence = only_sentence(splits)
    assert sentence.tokens == ["#", "Obama", "2024", "rocks"]
    assert entities(sentence) == [("Obama", "PER")]


def test_overlapping_spans_keep_the_longest_and_list_the_dropped_one():
    text = "Bank of America Tower"
    splits, report = convert_tasks([task(3, text, region(0, 15, "ORG", "Bank of America"),
                                         region(0, 21, "LOC", "Bank of America Tower"))], CONFIG)
    assert entities(only_sentence(splits)) == [("Bank of America Tower", "LOC")]
    [dropped] = report.spans
    assert dropped["task_id"] == 3 and dropped["reason"] == "overlap" and dropped["text"] == "Bank of America"


def test_overlap_policy_error_names_the_task():
    text = "Bank of America Tower"
    with pytest.raises(ConversionError, match="task 3"):
        convert_tasks([task(3, text, region(0, 15, "ORG", "Bank of America"),
                            region(0, 21, "LOC", "Bank of America Tower"))], CONFIG, overlap="error")


def test_cancelled_and_unlabeled_tasks_are_not_training_data_but_are_counted():
    tasks = [task(1, "Obama", region(0, 5, "PER", "Obama"), cancelled=True),
             {"id": 2, "data": {"text": "no annotations"}, "annotations": []},
             task(3, "Paris", region(0, 5, "LOC", "Paris"))]
    splits, report = convert_tasks(tasks, CONFIG)
    assert [s.task_id for group in splits.values() for s in group] == ["3"]
    assert report.counts["tasks_unlabeled"] == 2
    assert report.counts["annotations_cancelled"] == 1


def test_ground_truth_annotation_wins_over_a_later_one():
    later = {"id": 99, "result": [region(0, 5, "ORG", "Paris")], "was_cancelled": False, "ground_truth": False,
             "updated_at": "2026-06-01T00:00:00Z"}
    t = task(1, "Paris", region(0, 5, "LOC", "Paris"), extra_annotations=[later])
    t["annotations"][0]["ground_truth"] = True
    splits, _ = convert_tasks([t], CONFIG)
    assert entities(only_sentence(splits)) == [("Paris", "LOC")]


def test_non_label_results_are_ignored_and_counted():
    t = task(1, "Paris", region(0, 5, "LOC", "Paris"),
             {"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": ["pos"]}})
    _, report = convert_tasks([t], CONFIG)
    assert report.counts["results_ignored:choices"] == 1


def test_unknown_label_is_an_error_naming_the_task_or_ignored_with_a_count():
    t = task(42, "Paris", region(0, 5, "CITY", "Paris"))
    with pytest.raises(ConversionError, match=r"task 42.*'CITY'"):
        convert_tasks([t], CONFIG)
    _, report = convert_tasks([t], CONFIG, unknown_label="ignore")
    assert report.counts["spans_dropped:unknown_label"] == 1


@pytest.mark.parametrize("start,end,message", [(-1, 3, "negative or reversed"), (4, 2, "negative or reversed"),
                                               (0, 50, "outside the text")])
def test_bad_offsets_name_the_task_and_field(start, end, message):
    with pytest.raises(ConversionError, match=rf"task 5, field .*result\[0\]\.value.*{message}"):
        convert_tasks([task(5, "Paris", region(start, end, "LOC", "Paris"))], CONFIG)


def test_split_is_stable_and_follows_the_key():
    assert split_of("some text", 0.1, 0.1) == split_of("some text", 0.1, 0.1)
    sides = {split_of(f"text {i}", 0.1, 0.1) for i in range(200)}
    assert sides == {"train", "dev", "test"}


def test_duplicate_texts_land_on_one_side_and_conflicts_are_reported():
    tasks = [task(i, "Paris is nice", region(0, 5, "LOC", "Paris")) for i in range(1, 4)]
    tasks.append(task(4, "Paris is nice", region(0, 5, "PER", "Paris")))
    splits, report = convert_tasks(tasks, CONFIG)
    assert sum(1 for group in splits.values() if group) == 1
    assert report.counts["tasks_duplicate_conflicting_labels"] == 1


def write_export(tmp_path: Path, content: str) -> tuple[Path, Path]:
    export = tmp_path / "export.json"
    export.write_text(content, encoding="utf-8")
    config = tmp_path / "config.xml"
    config.write_text(CONFIG_XML, encoding="utf-8")
    return export, config


@pytest.mark.parametrize("content,message", [
    ("[{\"id\": 1, \"data\": ", "not valid JSON"),
    ("[]", "no tasks"),
    ('[{"id": 9, "data": {"other": "x"}, "annotations": []}]', r"task 9, field 'data\.text'"),
])
def test_bad_export_raises_and_leaves_previous_outputs_untouched(tmp_path, content, message):
    out = tmp_path / "conll"
    out.mkdir()
    (out / "train.conll").write_text("previous good file\n")
    export, config = write_export(tmp_path, content)
    with pytest.raises(ConversionError, match=message):
        run(export, config, out, tmp_path / "report.json")
    assert (out / "train.conll").read_text() == "previous good file\n"
    assert sorted(p.name for p in out.iterdir()) == ["train.conll"]
    assert not (tmp_path / "report.json").exists()


def test_run_writes_conll_labels_and_report_that_read_back_exactly(tmp_path):
    text = "Barack Obama 😀 visited 北京"
    tasks = [task(i, f"{text} #{i}", region(0, 12, "PER", "Barack Obama"), region(23, 25, "LOC", "北京"))
             for i in range(1, 30)]
    export, config = write_export(tmp_path, json.dumps(tasks, ensure_ascii=False))
    run(export, config, tmp_path / "conll", tmp_path / "report.json", scheme="BIOES")
    labels = json.loads((tmp_path / "conll" / "labels.json").read_text())
    assert labels["entity_types"] == ["PER", "LOC", "ORG"] and "S-LOC" in labels["tags"]
    sentences = [s for name in ("train", "dev", "test") for s in read_conll(tmp_path / "conll" / f"{name}.conll")]
    assert len(sentences) == 29
    by_id = {s.task_id: s for s in sentences}
    for t in tasks:
        s = by_id[str(t["id"])]
        for (start, end), token in zip(s.words, s.tokens):
            assert t["data"]["text"][start:end] == token
        assert s.tags[:2] == ["B-PER", "E-PER"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["labels"] == {"LOC": 29, "PER": 29}


def test_plain_two_column_conll_is_accepted(tmp_path):
    path = tmp_path / "plain.conll"
    path.write_text("-DOCSTART- O\n\nEU B-ORG\nrejects O\nGerman B-MISC\n\nPeter B-PER\n", encoding="utf-8")
    sentences = list(read_conll(path))
    assert [s.tokens for s in sentences] == [["EU", "rejects", "German"], ["Peter"]]
    assert sentences[0].tags == ["B-ORG", "O", "B-MISC"]
    write_conll(tmp_path / "again.conll", sentences)
    assert [s.tokens for s in read_conll(tmp_path / "again.conll")] == [s.tokens for s in sentences]


ALPHABET = st.sampled_from(list("abcXYZ019 ,.!#'-") + ["  ", "\r\n", "\t"] + list("北京天安门東京タワー서울")
                           + ["😀", "👍🏽", "👨\u200d👩\u200d👧", "e\u0301", "ß", "Ω", "ü"])


@st.composite
def annotated_texts(draw):
    text = "".join(draw(st.lists(ALPHABET, min_size=1, max_size=40)))
    cuts = sorted(draw(st.sets(st.integers(min_value=0, max_value=len(text)), max_size=10)))
    spans = []
    for start, end in zip(cuts[::2], cuts[1::2]):
        piece = text[start:end]
        edges_ok = piece and not (piece[0].isspace() or piece[-1].isspace()
                                  or unicodedata.category(piece[0]) in ("Cf", "Cc", "Mn")
                                  or unicodedata.category(piece[-1]) in ("Cf", "Cc"))
        if edges_ok and split_words(piece):
            spans.append((start, end, draw(st.sampled_from(["PER", "LOC", "ORG"]))))
    return text, spans


@settings(max_examples=300, deadline=None)
@given(annotated_texts(), st.sampled_from(["BIO", "BIOES"]))
def test_spans_round_trip_exactly_through_the_conll_files(tmp_path_factory, case, scheme):
    text, spans = case
    assume(split_words(text))  # a text without any word is not a training sentence
    tmp = tmp_path_factory.mktemp("rt")
    t = task(1, text, *[region(s, e, label, text[s:e]) for s, e, label in spans])
    run(tmp / "x.json", write_export(tmp, "[]")[1], tmp / "conll", tmp / "r.json", tasks=[t], scheme=scheme)
    [sentence] = [s for name in ("train", "dev", "test") for s in read_conll(tmp / "conll" / f"{name}.conll")]
    rebuilt = [(sentence.words[first][0], sentence.words[last - 1][1], label)
               for first, last, label in tags_to_spans(sentence.tags)]
    assert rebuilt == spans
    report = json.loads((tmp / "r.json").read_text())
    assert report["spans"] == []


def tricky_export(n: int, fake_objects: bool) -> list[dict]:
    """Non-ASCII texts, duplicates with conflicting labels, and (optionally) nested objects that look
    like tasks, which can fool a guess of where a task starts."""
    tasks = []
    for i in range(1, n + 1):
        text = f"Obama {{]}} visited 北京 😀 #{i % 40}"
        label = "PER" if i % 7 else "ORG"  # same text every 40 tasks, sometimes other labels
        t = task(i, text, region(0, 5, label, "Obama"),
                 region(text.index("北京"), text.index("北京") + 2, "LOC", "北京"))
        if fake_objects:
            t["data"] = {"origin": {"id": 99, "data": {"text": "x"}}, "text": text}
        tasks.append(t)
    tasks.append({"id": n + 1, "data": {"text": "no annotation"}, "annotations": []})
    return tasks


@pytest.mark.parametrize("fake_objects", [False, True])
@pytest.mark.parametrize("workers", [2, 5])
def test_parallel_ranges_give_the_same_output_as_one_pass(tmp_path, workers, fake_objects):
    export, config = write_export(tmp_path, json.dumps(tricky_export(3000, fake_objects), ensure_ascii=False,
                                                       indent=1 if fake_objects else None))
    run(export, config, tmp_path / "one", tmp_path / "one.json", workers=1)
    run(export, config, tmp_path / "many", tmp_path / "many.json", workers=workers, parallel_min_bytes=0)
    for name in ("train.conll", "dev.conll", "test.conll", "labels.json"):
        assert (tmp_path / "many" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    one = json.loads((tmp_path / "one.json").read_text())
    assert json.loads((tmp_path / "many.json").read_text()) == one
    assert one["counts"]["tasks_duplicate_conflicting_labels"] > 0


def test_a_wrong_guess_of_an_item_start_is_caught(tmp_path):
    from pipeline.jsonstream import RangeMismatch, find_item_start, first_item_start, iter_json_array

    tasks = tricky_export(50, fake_objects=True)
    export, _ = write_export(tmp_path, json.dumps(tasks, ensure_ascii=False))
    first = first_item_start(export)
    guess = find_item_start(export, first + 10)  # inside the first task's text: lands on the fake object
    assert export.read_bytes()[guess:guess + 8] == b'{"id": 9'
    with pytest.raises(RangeMismatch):
        list(iter_json_array(export, start=first, stop=guess))
    real = find_item_start(export, export.read_bytes().index(b'{"id": 2,'))
    assert [t["id"] for t in iter_json_array(export, start=first, stop=real)] == [1]
    assert [t["id"] for t in iter_json_array(export, start=real)] == list(range(2, 52))


def test_bad_task_in_a_parallel_run_reports_like_one_pass(tmp_path):
    tasks = tricky_export(2000, fake_objects=False)
    tasks[1500]["annotations"][0]["result"][0]["value"]["end"] = -3
    export, config = write_export(tmp_path, json.dumps(tasks, ensure_ascii=False))
    with pytest.raises(ConversionError, match=r"task 1501, field .*negative or reversed"):
        run(export, config, tmp_path / "out", tmp_path / "r.json", workers=2, parallel_min_bytes=0)
    assert not (tmp_path / "out").exists()
