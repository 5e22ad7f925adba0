"""Duplicate texts and task ids, found once a conversion ends, in memory that stays small at a million tasks.

Each converted task leaves a record of about 32 bytes: its id (an int64 array; ids that are strings or do
not fit are kept aside by position), a 16-byte digest of its text and a hash of its tags. Ranges converted
in parallel hand their records to the parent, which joins them in export order, so the report is the same as
from one pass. Finding duplicates sorts the records (numpy) instead of building dicts of a million entries:
the report lists, in export order, every repeated task id and every repeated text whose tags differ from
its first occurrence.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.labelstudio.report import ConvertReport

INT64 = (-(2**63), 2**63 - 1)


@dataclass
class TaskRecords:
    """(task id, text digest, tags hash) per converted task, in export order, packed."""

    ids: array = field(default_factory=lambda: array("q"))
    digests: bytearray = field(default_factory=bytearray)
    tags: array = field(default_factory=lambda: array("q"))
    odd_ids: dict[int, Any] = field(default_factory=dict)  # position -> an id that is not an int64

    def __len__(self) -> int:
        return len(self.tags)

    def add(self, task_id: Any, text: str, tags: tuple[str, ...]) -> None:
        if isinstance(task_id, int) and INT64[0] <= task_id <= INT64[1]:
            self.ids.append(task_id)
        else:
            self.odd_ids[len(self.tags)] = task_id
            self.ids.append(0)
        self.digests += hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        self.tags.append(hash(tags))

    def extend(self, other: TaskRecords) -> None:
        """Append another range's records (the next range of the export)."""
        offset = len(self)
        self.ids.extend(other.ids)
        self.digests += other.digests
        self.tags.extend(other.tags)
        self.odd_ids.update((offset + pos, task_id) for pos, task_id in other.odd_ids.items())

    def task_id(self, pos: int) -> Any:
        return self.odd_ids.get(pos, self.ids[pos])


def _firsts(keys: list[np.ndarray]) -> np.ndarray:
    """For each record, the position of the first record with the same keys (its own if it is the first)."""
    n = len(keys[0])
    order = np.lexsort([np.arange(n), *reversed(keys)])  # by keys, then by position
    same_as_previous = np.ones(n - 1, dtype=bool)
    for key in keys:
        ordered = key[order]
        same_as_previous &= ordered[1:] == ordered[:-1]
    starts = np.flatnonzero(np.concatenate(([True], ~same_as_previous)))
    firsts = np.empty(n, dtype=np.int64)
    firsts[order] = np.repeat(order[starts], np.diff(np.append(starts, n)))  # a group's first: its least position
    return firsts


def _id_firsts(records: TaskRecords) -> np.ndarray:
    """First position of each record's id, comparing ids as text (5 and "5" are one id, as in the CoNLL files)."""
    if not records.odd_ids:
        return _firsts([np.frombuffer(records.ids, dtype=np.int64)])
    first: dict[str, int] = {}
    return np.array([first.setdefault(str(records.task_id(pos)), pos) for pos in range(len(records))],
                    dtype=np.int64)


def report_duplicates(records: TaskRecords, report: ConvertReport) -> None:
    """Count repeated texts and ids; list texts whose labels differ from the first occurrence, and
    every repeated task id (the CoNLL files would hold two sentences under one id)."""
    if not len(records):
        return
    digests = np.frombuffer(records.digests, dtype=np.uint64).reshape(-1, 2)
    tags = np.frombuffer(records.tags, dtype=np.int64)
    text_first = _firsts([digests[:, 0], digests[:, 1]])
    id_first = _id_firsts(records)
    positions = np.arange(len(records))
    repeated_text = text_first != positions
    conflict = repeated_text & (tags != tags[text_first])
    repeated_id = id_first != positions
    for key, flags in (("tasks_duplicate_text", repeated_text), ("tasks_duplicate_conflicting_labels", conflict),
                       ("tasks_duplicate_id", repeated_id)):
        if flags.any():  # a count appears only when there is something to count, as the report always did
            report.counts[key] += int(flags.sum())
    for pos in np.flatnonzero(repeated_id | conflict).tolist():
        task_id = records.task_id(pos)
        if repeated_id[pos]:
            earlier = int(id_first[pos])
            same_text = bool((digests[earlier] == digests[pos]).all())
            report.spans.append({"task_id": task_id, "action": "reported",
                                 "reason": "duplicate_id" if same_text else "duplicate_id_different_text",
                                 "duplicate_of": records.task_id(earlier)})
        if conflict[pos]:
            report.spans.append({"task_id": task_id, "action": "reported", "reason": "duplicate_conflict",
                                 "duplicate_of": records.task_id(int(text_first[pos]))})
