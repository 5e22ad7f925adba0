"""Duplicate texts and task ids, found once a conversion ends, in memory that stays small at a million tasks.

Each converted task leaves a record of about 32 bytes: its id (an int64 array; ids that are strings or do
not fit are kept aside by position), a 16-byte digest of its text and a hash of its tags. Ranges converted
in parallel write their records to a file; the parent reads them into arrays sized once, in export order
(:meth:`TaskRecords.join`), so the report is the same as from one pass and no range's records sit in memory
twice. Finding duplicates sorts the records (numpy) instead of building dicts of a million entries:
the report lists, in export order, every repeated task id and every repeated text whose tags differ from
its first occurrence.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import dataclass, field
from pathlib import Path
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

    def task_id(self, pos: int) -> Any:
        return self.odd_ids.get(pos, self.ids[pos])

    def dump(self, path: Path) -> None:
        """Write the records to ``path``: a count, the ids, digests and tag hashes; odd ids as JSON beside it."""
        with path.open("wb") as fh:
            fh.write(len(self).to_bytes(8, "little"))
            self.ids.tofile(fh)
            fh.write(self.digests)
            self.tags.tofile(fh)
        _odd_file(path).write_text(json.dumps(list(self.odd_ids.items())), encoding="utf-8")

    @classmethod
    def join(cls, paths: list[Path]) -> TaskRecords:
        """The records of ``paths`` (written by :meth:`dump`) one after the other, read into arrays sized once."""
        counts = []
        for path in paths:
            with path.open("rb") as fh:
                counts.append(int.from_bytes(fh.read(8), "little"))
        total = sum(counts)
        joined = cls(array("q", bytes(8 * total)), bytearray(16 * total), array("q", bytes(8 * total)))
        views = [memoryview(joined.ids).cast("B"), memoryview(joined.digests), memoryview(joined.tags).cast("B")]
        offset = 0
        for path, n in zip(paths, counts):
            with path.open("rb") as fh:
                fh.seek(8)
                for view, width in zip(views, (8, 16, 8)):
                    fh.readinto(view[width * offset:width * (offset + n)])
            odd = json.loads(_odd_file(path).read_text(encoding="utf-8"))
            joined.odd_ids.update((offset + pos, task_id) for pos, task_id in odd)
            offset += n
        return joined


def _odd_file(path: Path) -> Path:
    return path.with_name(path.name + ".odd.json")


def _firsts(keys: np.ndarray) -> np.ndarray:
    """For each row of ``keys`` (n x k), the position of the first row equal to it (its own if it is the first).

    One stable sort (rows in export order within a group), then each group's first position spread back;
    the temporaries are freed as soon as they are used, since at a million tasks each is 8-16 MB.
    """
    n = len(keys)
    order = np.lexsort(keys.T[::-1])  # stable: by the first column, then the next, ...; equal rows by position
    ordered = keys[order]
    starts = np.ones(n, dtype=bool)
    starts[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    del ordered
    group = np.maximum.accumulate(np.where(starts, np.arange(n), 0))  # sorted index of each row's group start
    del starts
    firsts = np.empty(n, dtype=np.int64)
    firsts[order] = order[group]
    return firsts


def _id_firsts(records: TaskRecords) -> np.ndarray:
    """First position of each record's id, comparing ids as text (5 and "5" are one id, as in the CoNLL files)."""
    if not records.odd_ids:
        return _firsts(np.frombuffer(records.ids, dtype=np.int64).reshape(-1, 1))
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
    text_first = _firsts(digests)
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
