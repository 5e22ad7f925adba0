import json
import re
import unicodedata
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.core.config import ConvertConfig
from pipeline.core.conll import read_conll, write_conll
from pipeline.core.errors import ConversionError, TaskError
from pipeline.core.tags import tags_to_spans
from pipeline.core.words import split_words
from pipeline.labelstudio.convert import run
from pipeline.labelstudio.labelconfig import parse_label_config
from pipeline.labelstudio.sentences import convert_tasks, split_of

CONFIG_XML = """<View>
  <Labels name="label" toName="text">
    <Label value="PER"/><Label value="LOC"/><Label value="ORG"/>
  </Labels>
  <Text name="text" value="$text"/>
</View>"""
CONFIG = parse_label_config(CONFIG_XML)
SKIP_BROKEN = ConvertConfig(bad_tasks="skip")
IGNORE_UNKNOWN = ConvertConfig(unknown_label="ignore")


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
                            region(0, 21, "LOC", "Bank of America Tower"))], CONFIG,
                      policies=ConvertConfig(overlap="error"))


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
    _, report = convert_tasks([t, task(43, "Obama", region(0, 5, "PER", "Obama"))], CONFIG, policies=IGNORE_UNKNOWN)
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
    run(export, config, tmp_path / "conll", tmp_path / "report.json", policies=ConvertConfig(scheme="BIOES"))
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
    run(tmp / "x.json", write_export(tmp, "[]")[1], tmp / "conll", tmp / "r.json", tasks=[t],
        policies=ConvertConfig(scheme=scheme))
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
    from pipeline.labelstudio.jsonstream import RangeMismatch, find_item_start, first_item_start, iter_json_array

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
        run(export, config, tmp_path / "out", tmp_path / "r.json", workers=2, parallel_min_bytes=0,
            policies=ConvertConfig(bad_tasks="error"))
    assert not (tmp_path / "out").exists()
    run(export, config, tmp_path / "one", tmp_path / "one.json", workers=1, policies=SKIP_BROKEN)
    run(export, config, tmp_path / "many", tmp_path / "many.json", workers=2, parallel_min_bytes=0,
        policies=SKIP_BROKEN)
    one = json.loads((tmp_path / "one.json").read_text())
    assert json.loads((tmp_path / "many.json").read_text()) == one
    assert [(t["task_id"], t["field"]) for t in one["skipped_tasks"]] == [
        (1501, "annotations[id=15010].result[0].value")]
    assert (tmp_path / "many" / "train.conll").read_bytes() == (tmp_path / "one" / "train.conll").read_bytes()


# --- broken tasks: skipped and listed (convert.bad_tasks: skip), or the first one stops (error) ---

def broken(task_id, case):
    """A task broken in one of the ways real exports (or hand edits of them) are."""
    t = task(task_id, "Paris is nice", region(0, 5, "LOC", "Paris"))
    ann = t["annotations"][0]
    if case == "annotation_null":
        t["annotations"] = [None]
    elif case == "result_object":
        ann["result"] = {}
    elif case == "result_null_item":
        ann["result"] = [None]
    elif case == "value_text_number":
        ann["result"][0]["value"]["text"] = 12345
    elif case == "lone_surrogate":
        t["data"]["text"] = "Paris \ud800 nice"
    elif case == "value_null":
        ann["result"][0]["value"] = None
    elif case == "labels_string":
        ann["result"][0]["value"]["labels"] = "LOC"
    elif case == "reversed_offsets":
        ann["result"][0]["value"].update(start=5, end=0)
    return t


BROKEN = {
    "annotation_null": ("annotations[0]", "expected an annotation object, got null"),
    "result_object": ("annotations[id=20].result", "expected a list of results, got an object"),
    "result_null_item": ("annotations[id=20].result[0]", "expected a result object, got null"),
    "value_text_number": ("annotations[id=20].result[0].value.text", "expected a string, got a number"),
    "lone_surrogate": ("data.text", r"lone surrogate \(\\ud800\) at index 6"),
    "value_null": ("annotations[id=20].result[0]", "expected a 'value' object, got null"),
    "labels_string": ("annotations[id=20].result[0].value.labels", "expected a list of label names"),
    "reversed_offsets": ("annotations[id=20].result[0].value", "negative or reversed"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_task_is_skipped_and_listed_with_its_field(case):
    field, message = BROKEN[case]
    splits, report = convert_tasks([task(1, "Obama", region(0, 5, "PER", "Obama")), broken(2, case)], CONFIG,
                                   policies=SKIP_BROKEN)
    assert [s.task_id for group in splits.values() for s in group] == ["1"]
    [skipped] = report.skipped
    assert (skipped["task_id"], skipped["field"]) == (2, field)
    assert re.search(message, skipped["error"]) and skipped["error"].startswith(f"task 2, field '{field}': ")
    assert report.counts["tasks_skipped"] == 1


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_bad_tasks_error_stops_at_the_first_naming_task_and_field(case):
    field, message = BROKEN[case]
    with pytest.raises(TaskError, match=rf"^task 2, field '{re.escape(field)}': .*{message}"):
        convert_tasks([task(1, "Obama", region(0, 5, "PER", "Obama")), broken(2, case)], CONFIG,
                      policies=ConvertConfig(bad_tasks="error"))


def test_a_skipped_task_leaves_nothing_of_itself_in_the_counts_or_span_list():
    # the first span is trimmed (a listed change), then the second turns out broken
    t = task(2, "met  Obama  today", region(3, 12, "PER", "  Obama  "), region(0, 3, "PER", 12345))
    splits, report = convert_tasks([task(1, "Paris", region(0, 5, "LOC", "Paris")), t], CONFIG, policies=SKIP_BROKEN)
    assert report.spans == [] and report.counts["spans_changed:trimmed_whitespace"] == 0
    assert report.counts["spans_matching_config"] == 1 and report.counts["annotations_used"] == 1
    assert [s["task_id"] for s in report.skipped] == [2]


def test_only_broken_tasks_stop_the_conversion_naming_the_first():
    with pytest.raises(ConversionError, match=r"no task could be converted: 2 skipped as broken, the first task 2, "
                                              r"field 'annotations\[0\]'"):
        convert_tasks([broken(2, "annotation_null"), broken(3, "result_object")], CONFIG, policies=SKIP_BROKEN)


@pytest.mark.parametrize("item,message", [
    ([1, 2], r"item 1 of the export is a list, not a task object"),
    ({"id": True, "data": {"text": "x"}}, r"item 1 of the export has task id True"),
    ({"id": "7\n# task_id = 8", "data": {"text": "x"}}, r"item 1 of the export has task id '7\\n# task_id = 8'"),
    ({"id": 1.5, "data": {"text": "x"}}, r"item 1 of the export has task id 1\.5"),
])
def test_an_item_that_is_not_a_task_with_a_usable_id_stops_even_when_skipping(item, message):
    with pytest.raises(ConversionError, match=message):
        convert_tasks([item], CONFIG)


def test_a_report_holding_a_lone_surrogate_from_the_export_is_still_written(tmp_path):
    export, config = write_export(tmp_path, "[]")
    t = task(1, "Paris", region(0, 5, "LOC", "Paris"), region(0, 5, "LOC", "Pa\ud800"))  # its value.text
    t["annotations"][0]["result"][1]["value"]["labels"] = ["CITY\udfff"]
    run(export, config, tmp_path / "conll", tmp_path / "r.json", tasks=[t], policies=IGNORE_UNKNOWN)
    [dropped] = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["spans"]
    assert dropped["label"] == "CITY\udfff" and dropped["reason"] == "unknown_label"


# --- silent losses: spans of another control or object, renamed controls, repeated task ids ---

def test_spans_of_another_control_or_object_are_listed_with_their_task():
    other_control = dict(region(6, 11, "PER", "Obama"), from_name="ner")
    other_object = dict(region(6, 11, "PER", "Obama"), to_name="title")
    _, report = convert_tasks([task(1, "Paris Obama", region(0, 5, "LOC", "Paris"), other_control),
                               task(2, "Paris Obama", region(0, 5, "LOC", "Paris"), other_object)], CONFIG)
    listed = [(s["task_id"], s["reason"], s["from_name"], s["to_name"], s["start"], s["label"]) for s in report.spans]
    assert listed == [(1, "other_control", "ner", "text", 6, "PER"), (2, "other_object", "label", "title", 6, "PER")]
    assert report.counts["spans_dropped:other_control"] == 1 and report.counts["spans_dropped:other_object"] == 1


def test_an_export_whose_control_was_renamed_stops_instead_of_training_on_all_o():
    tasks = [task(i, "Paris Obama", dict(region(0, 5, "LOC", "Paris"), from_name="ner")) for i in range(1, 4)]
    with pytest.raises(ConversionError, match=r"none of the 3 span results matches the label config "
                                              r"\(<Labels name='label' toName='text'>.*from_name='ner' to_name='text' "
                                              r"type='labels' \(3\)"):
        convert_tasks(tasks, CONFIG)


def test_all_labels_unknown_under_ignore_stops_too():
    with pytest.raises(ConversionError, match="every label is one the config does not define"):
        convert_tasks([task(1, "Paris", region(0, 5, "CITY", "Paris"))], CONFIG, policies=IGNORE_UNKNOWN)


def test_repeated_task_ids_are_listed_saying_whether_the_text_differs():
    tasks = [task(1, "Paris", region(0, 5, "LOC", "Paris")), task(1, "Obama", region(0, 5, "PER", "Obama")),
             task(1, "Paris", region(0, 5, "LOC", "Paris"))]
    tasks[1]["id"] = "1"  # the same id to the CoNLL files, which write "# task_id = 1"
    _, report = convert_tasks(tasks, CONFIG)
    listed = [(s["reason"], s["duplicate_of"]) for s in report.spans]
    assert listed == [("duplicate_id_different_text", 1), ("duplicate_id", 1)]
    assert report.counts["tasks_duplicate_id"] == 2


# --- value.text that disagrees with text[start:end] in a known way: the offsets are right, kept ---

@pytest.mark.parametrize("text,start,end,value_text,quirk", [
    ("Text: Berlin,  Germany.", 6, 22, "Berlin, Germany", "whitespace_normalised"),     # label-studio#3078
    ("4   cm long", 0, 6, "4 cm", "whitespace_normalised"),                            # #5338
    ("Line one\r\nLondon Bridge", 5, 16, "one\nLondon", "whitespace_normalised"),     # CR LF as LF
    ("visit New\nYork soon", 6, 14, "NewYork", "line_breaks_removed"),                 # #1863
    ("shares of AT&T rose", 10, 14, "AT&amp;T", "html_escaped"),                      # #4929
    ("Some simple text with", 5, 16, "ple tex", "word_granularity"),                  # #1931
    ("Paris is nice", 0, 5, None, "no_value_text"),                                   # #6027
])
def test_known_value_text_disagreements_keep_the_offsets_and_are_counted(text, start, end, value_text, quirk):
    r = region(start, end, "LOC", value_text)
    if value_text is None:
        del r["value"]["text"]
    splits, report = convert_tasks([task(1, text, r)], CONFIG)
    assert entities(only_sentence(splits)) == [(text[start:end].strip(), "LOC")]
    assert report.counts[f"spans_accepted:{quirk}"] == 1
    assert [s["reason"] for s in report.spans] in ([], ["trimmed_whitespace"])


def test_a_value_text_that_only_looks_like_a_quirk_is_still_moved_or_dropped():
    # "Obama" inside "Obamas" would be word granularity only if the offsets covered "Obamas"; here they cover "met"
    splits, report = convert_tasks([task(1, "met Obamas", region(0, 3, "PER", "Obama"))], CONFIG)
    assert [s["reason"] for s in report.spans] == ["shifted"]
    assert report.counts["spans_accepted:word_granularity"] == 0
