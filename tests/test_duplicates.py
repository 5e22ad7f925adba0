"""Duplicate texts and ids found by sorting packed records: the same report as the plain dict walk it replaced."""

from __future__ import annotations

from typing import Any
from unittest.mock import patch

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.labelstudio import duplicates
from pipeline.labelstudio.duplicates import TaskRecords, report_duplicates
from pipeline.labelstudio.report import ConvertReport


def dict_walk(rows: list[tuple[Any, str, tuple[str, ...]]], report: ConvertReport) -> None:
    """The reference: one pass with two dicts (what convert did before; memory grows with every task)."""
    first: dict[str, tuple[Any, tuple]] = {}
    ids: dict[str, tuple[Any, str]] = {}
    for task_id, text, tags in rows:
        earlier = ids.get(str(task_id))
        if earlier is None:
            ids[str(task_id)] = (task_id, text)
        else:
            report.counts["tasks_duplicate_id"] += 1
            report.spans.append({"task_id": task_id, "action": "reported",
                                 "reason": "duplicate_id" if earlier[1] == text else "duplicate_id_different_text",
                                 "duplicate_of": earlier[0]})
        seen = first.get(text)
        if seen is None:
            first[text] = (task_id, tags)
            continue
        report.counts["tasks_duplicate_text"] += 1
        if seen[1] != tags:
            report.counts["tasks_duplicate_conflicting_labels"] += 1
            report.spans.append({"task_id": task_id, "action": "reported", "reason": "duplicate_conflict",
                                 "duplicate_of": seen[0]})


task_ids = st.one_of(st.integers(0, 6), st.sampled_from(["3", "a", "b"]), st.just(2**70))
rows = st.lists(st.tuples(task_ids, st.sampled_from(["x", "y", "z w", "é"]),
                          st.sampled_from([("O",), ("B-PER",), ("O", "O")])), max_size=40)


@settings(max_examples=300, deadline=None)
@given(rows, st.integers(0, 40), st.sampled_from([1, 2, 3, 5, duplicates.BLOCK]))
def test_same_report_as_the_dict_walk_in_one_pass_or_joined_ranges(tmp_path_factory, rows, cut, block):
    """Also with blocks of a few records, so that groups and duplicates straddle the blocks' edges."""
    expected = ConvertReport()
    dict_walk(rows, expected)
    one, head, tail = TaskRecords(), TaskRecords(), TaskRecords()  # head and tail: two ranges side by side
    for k, (task_id, text, tags) in enumerate(rows):
        one.add(task_id, text, tags)
        (head if k < cut else tail).add(task_id, text, tags)
    folder = tmp_path_factory.mktemp("records")
    head.dump(folder / "0.records")
    tail.dump(folder / "1.records")
    for records in (one, TaskRecords.join([folder / "0.records", folder / "1.records"])):
        got = ConvertReport()
        with patch.object(duplicates, "BLOCK", block):
            report_duplicates(records, got)
        assert got.spans == expected.spans
        assert got.counts == expected.counts


def test_a_million_records_stay_small():
    records = TaskRecords()
    for k in range(100_000):
        records.add(k, f"text {k % 1000}", ("O",))
    size = len(records.ids) * 8 + len(records.digests_hi) + len(records.digests_lo) + len(records.tags) * 8
    assert size == 32 * 100_000  # ~32 MB at a million tasks, where the tuples and dicts took several hundred
    report = ConvertReport()
    report_duplicates(records, report)
    assert report.counts["tasks_duplicate_text"] == 99_000 and report.spans == []
