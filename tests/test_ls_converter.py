"""Our exact converter against Label Studio's own (``label_studio_sdk.converter``).

Where that converter is right (English text, entities on token edges) both
give the same entities; each known divergence has a test showing ours right.
"""

import gzip
import json

import pytest

from pipeline.core.config import ConvertConfig
from pipeline.core.tags import tags_to_spans
from pipeline.labelstudio.labelconfig import parse_label_config, read_label_config
from pipeline.labelstudio.ls_converter import convert_items
from pipeline.labelstudio.sentences import convert_tasks
from pipeline.labelstudio.tasks import iter_export
from tests.conftest import ROOT
from tests.test_convert import CONFIG_XML, region, task

SAMPLE = ROOT / "data" / "labelstudio" / "export.json"
SAMPLE_CONFIG = ROOT / "data" / "labelstudio" / "label_config.xml"


def entities(sentence):
    return [(sentence.words[a][0], sentence.words[b - 1][1], label) for a, b, label in tags_to_spans(sentence.tags)]


def both(tmp_path, tasks):
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks, ensure_ascii=False), encoding="utf-8")
    config = tmp_path / "config.xml"
    config.write_text(CONFIG_XML, encoding="utf-8")
    theirs = [s for _, s in convert_items(export, config)]
    splits, report = convert_tasks(tasks, parse_label_config(CONFIG_XML))
    ours = [s for group in splits.values() for s in group]
    return ours, theirs, report


def test_same_entities_as_label_studio_converter_on_the_english_sample():
    theirs = {str(tid): s for tid, s in convert_items(SAMPLE, SAMPLE_CONFIG)}
    splits, _ = convert_tasks(iter_export(SAMPLE), read_label_config(SAMPLE_CONFIG))
    ours = [s for group in splits.values() for s in group]
    assert len(ours) > 2000
    for sentence in ours:
        assert entities(sentence) == entities(theirs[sentence.task_id]), sentence.text


def test_chinese_is_one_token_for_them_one_per_character_for_us(tmp_path):
    text = "我爱北京天安门"
    [ours], [theirs], _ = both(tmp_path, [task(1, text, region(2, 4, "LOC", "北京"))])
    assert theirs.tokens == [text] and theirs.tags == ["B-LOC"]  # the whole sentence becomes the entity
    assert entities(ours) == [(2, 4, "LOC")]


def test_overlapping_spans_are_mangled_silently_by_them_resolved_and_reported_by_us(tmp_path):
    text = "Bank of America Tower"
    t = task(1, text, region(0, 15, "ORG", "Bank of America"), region(0, 21, "LOC", "Bank of America Tower"))
    [ours], [theirs], report = both(tmp_path, [t])
    assert entities(theirs) == [(0, 15, "ORG"), (16, 21, "LOC")]  # neither annotated span survives
    assert entities(ours) == [(0, 21, "LOC")]
    assert [s["reason"] for s in report.spans] == ["overlap"]


def test_partly_labelled_word_is_widened_by_them_cut_by_us(tmp_path):
    text = "I like #Obama2024 a lot"
    [ours], [theirs], _ = both(tmp_path, [task(1, text, region(8, 13, "PER", "Obama"))])
    assert entities(theirs) == [(8, 17, "PER")]
    assert entities(ours) == [(8, 13, "PER")]


def test_utf16_offsets_after_emoji_shift_their_entity_not_ours(tmp_path):
    text = "😀😀 Obama and Paris"
    # a UTF-16 based tool: each emoji counts twice, so "Obama" sits at 5..10 instead of 3..8
    [ours], [theirs], _ = both(tmp_path, [task(1, text, region(5, 10, "PER", "Obama"))])
    assert entities(ours) == [(3, 8, "PER")]
    assert entities(theirs) != [(3, 8, "PER")]


def test_they_turn_unlabeled_tasks_into_all_o_sentences_we_leave_them_for_predict(tmp_path):
    tasks = [task(1, "Paris", region(0, 5, "LOC", "Paris")), {"id": 2, "data": {"text": "Obama"}, "annotations": []}]
    ours, theirs, report = both(tmp_path, tasks)
    assert [s.task_id for s in ours] == ["1"]
    assert [s.task_id for s in theirs] == ["1", "2"] and theirs[1].tags == ["O"]
    assert report.counts["tasks_unlabeled"] == 1


def test_engine_is_selectable_from_params(tmp_path):
    from pipeline.stages.convert import main

    params = {"paths": {"export": str(SAMPLE), "label_config": str(SAMPLE_CONFIG), "conll_dir": str(tmp_path / "c"),
                        "convert_report": str(tmp_path / "r.json")},
              "convert": {"engine": "ls-converter", "scheme": "BIO", "overlap": "longest",
                          "annotations": "ground_truth_or_latest", "unknown_label": "error", "bad_tasks": "error",
                          "split": {"key": "text", "dev": 0.1, "test": 0.1}}}
    main(params)
    assert json.loads((tmp_path / "r.json").read_text())["engine"] == "ls-converter"
    lines = (tmp_path / "c" / "train.conll").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# task_id = ") and lines[1].count("\t") == 3
    with pytest.raises(Exception, match="BIO only"):
        params["convert"]["scheme"] = "BIOES"
        main(params)


LS_POLICIES = ConvertConfig(split={"dev": 0.0, "test": 0.0})  # the defaults, every sentence in train


def ls_run(tmp_path, tasks, **policies):
    from pipeline.labelstudio.ls_converter import run

    tmp_path.mkdir(parents=True, exist_ok=True)
    export = tmp_path / "export.json.gz"  # gzip too: the engine reads the export with our reader
    export.write_bytes(gzip.compress(json.dumps(tasks, ensure_ascii=False).encode()))
    config = tmp_path / "config.xml"
    config.write_text(CONFIG_XML, encoding="utf-8")
    report = run(export, config, tmp_path / "conll", tmp_path / "r.json",
                 policies=ConvertConfig(split=LS_POLICIES.split, **policies))
    lines = (tmp_path / "conll" / "train.conll").read_text(encoding="utf-8").split("\n\n")
    return [block for block in lines if block.strip()], report


def test_the_sdk_engine_honours_the_overlap_policy(tmp_path):
    from pipeline.core.errors import ConversionError

    t = task(1, "Bank of America Tower", region(0, 15, "ORG", "Bank of America"),
             region(0, 21, "LOC", "Bank of America Tower"))
    [sentence], report = ls_run(tmp_path, [t])
    assert "B-LOC" in sentence and "ORG" not in sentence  # the longest span, as the exact engine keeps
    assert report["counts"]["spans_dropped:overlap"] == 1
    with pytest.raises(ConversionError, match="task 1.*overlaps"):
        ls_run(tmp_path / "e", [t], overlap="error")


def test_the_sdk_engine_honours_the_annotation_and_unknown_label_policies(tmp_path):
    from pipeline.core.errors import ConversionError

    t = task(1, "Paris and Obama", region(0, 5, "LOC", "Paris"))
    second = dict(task(1, "Paris and Obama", region(10, 15, "PER", "Obama"))["annotations"][0], id=99,
                  ground_truth=True)
    t["annotations"].append(second)
    [sentence], _ = ls_run(tmp_path / "gt", [t])
    assert "B-PER" in sentence and "B-LOC" not in sentence  # the ground truth only
    both, _ = ls_run(tmp_path / "all", [t], annotations="all")
    assert len(both) == 2
    odd = task(2, "Paris", region(0, 5, "CITY", "Paris"))
    with pytest.raises(ConversionError, match="task 2.*'CITY' is not in the label config"):
        ls_run(tmp_path / "err", [odd])
    [kept], report = ls_run(tmp_path / "ign", [odd], unknown_label="ignore")
    assert "CITY" not in kept and report["counts"]["spans_dropped:unknown_label"] == 1


@pytest.mark.parametrize("policy,message", [({"bad_tasks": "skip"}, "convert.bad_tasks"),
                                            ({"scheme": "BIOES"}, "BIO only")])
def test_the_sdk_engine_refuses_what_it_cannot_follow(tmp_path, policy, message):
    from pipeline.core.errors import ConversionError

    with pytest.raises(ConversionError, match=message):
        ls_run(tmp_path, [task(1, "Paris", region(0, 5, "LOC", "Paris"))], **policy)
    assert not (tmp_path / "conll").exists()


@pytest.mark.parametrize("data,message", [
    (lambda text: text.encode("latin-1"), r"is not UTF-8: byte \d+ \(0xE9\)"),
    (lambda text: text.encode("utf-16"), r"is UTF-16LE"),
    (lambda text: b"[" * 100_000 + b"]" * 100_000, "nests lists or objects too deeply"),
])
def test_the_sdk_engine_refuses_unreadable_exports_in_one_line(tmp_path, data, message):
    from pipeline.core.errors import ConversionError
    from pipeline.labelstudio.ls_converter import run

    export = tmp_path / "export.json"
    export.write_bytes(data(json.dumps([task(1, "café Paris", region(5, 10, "LOC", "Paris"))], ensure_ascii=False)))
    config = tmp_path / "config.xml"
    config.write_text(CONFIG_XML, encoding="utf-8")
    with pytest.raises(ConversionError, match=message):
        run(export, config, tmp_path / "conll", tmp_path / "r.json", policies=LS_POLICIES)
    assert not (tmp_path / "conll").exists()
