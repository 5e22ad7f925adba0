"""Duplicate texts and task ids, found once a conversion ends, in memory that stays small at a million tasks.

Each converted task leaves a record of 32 bytes: its id (an int64 array; ids that are strings or do
not fit are kept aside by position), a 16-byte digest of its text (two 8-byte halves, each in its own array,
so that sorting reads them in place) and a hash of its tags. Ranges converted
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
BLOCK = 1 << 16  # records per block in the element-wise steps (a block's temporaries: under 1 MB)


@dataclass
class TaskRecords:
    """(task id, text digest, tags hash) per converted task, in export order, packed."""

    ids: array = field(default_factory=lambda: array("q"))
    digests_hi: bytearray = field(default_factory=bytearray)  # the text digest's first 8 bytes
    digests_lo: bytearray = field(default_factory=bytearray)  # and its last 8
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
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        self.digests_hi += digest[:8]
        self.digests_lo += digest[8:]
        self.tags.append(hash(tags))

    def task_id(self, pos: int) -> Any:
        return self.odd_ids.get(pos, self.ids[pos])

    def dump(self, path: Path) -> None:
        """Write the records to ``path``: a count, the ids, digests and tag hashes; odd ids as JSON beside it."""
        with path.open("wb") as fh:
            fh.write(len(self).to_bytes(8, "little"))
            self.ids.tofile(fh)
            fh.write(self.digests_hi)
            fh.write(self.digests_lo)
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
        joined = cls(array("q", bytes(8 * total)), bytearray(8 * total), bytearray(8 * total),
                     array("q", bytes(8 * total)))
        views = [memoryview(joined.ids).cast("B"), memoryview(joined.digests_hi), memoryview(joined.digests_lo),
                 memoryview(joined.tags).cast("B")]
        offset = 0
        for path, n in zip(paths, counts):
            with path.open("rb") as fh:
                fh.seek(8)
                for view in views:
                    fh.readinto(view[8 * offset:8 * (offset + n)])
            odd = json.loads(_odd_file(path).read_text(encoding="utf-8"))
            joined.odd_ids.update((offset + pos, task_id) for pos, task_id in odd)
            offset += n
        return joined


def _odd_file(path: Path) -> Path:
    return path.with_name(path.name + ".odd.json")


def _index_type(n: int) -> type:
    """The narrowest integer type that holds every position of ``n`` records (int32 up to 2**31)."""
    return np.int32 if n < 2**31 else np.int64


def _blocks(n: int) -> range:
    """Starts of the blocks that element-wise steps walk, so that their temporaries stay at a block's size."""
    return range(0, n, BLOCK)


def _firsts(columns: list[np.ndarray]) -> np.ndarray:
    """For each record, the position of the first record whose key is equal to its own (its own if it is first).

    A record's key is its values in ``columns`` (equal-length, contiguous 1-d arrays, read in place). One stable
    sort (records in export order within a group), then each group's first position spread back. At a million
    records an array of positions is 4 MB (int32): the sort's order, each group's first position and the
    result are held at once, nothing else at full size (the sorted keys are compared, the groups counted and
    the result written a block at a time).
    """
    n = len(columns[0])
    index = _index_type(n)
    order = np.lexsort(columns[::-1]).astype(index)  # stable: by the first column, then the next, ...
    starts = np.zeros(n, dtype=bool)  # the sorted record begins a group
    starts[0] = True
    for lo in _blocks(n):
        around = order[lo:lo + BLOCK + 1]  # the block and the record after it
        for column in columns:
            ordered = column[around]
            starts[lo + 1:lo + len(around)] |= ordered[1:] != ordered[:-1]
    heads = order[starts]  # each group's first position (the stable sort put it first)
    firsts = np.empty(n, dtype=index)
    groups_before = 0
    for lo in _blocks(n):
        group = np.cumsum(starts[lo:lo + BLOCK], dtype=index)  # 1 + each sorted record's group in the block
        group += groups_before - 1
        firsts[order[lo:lo + BLOCK]] = heads[group]
        groups_before = int(group[-1]) + 1
    return firsts


def _id_firsts(records: TaskRecords) -> np.ndarray:
    """First position of each record's id, comparing ids as text (5 and "5" are one id, as in the CoNLL files)."""
    if not records.odd_ids:
        return _firsts([np.frombuffer(records.ids, dtype=np.int64)])
    first: dict[str, int] = {}
    return np.array([first.setdefault(str(records.task_id(pos)), pos) for pos in range(len(records))],
                    dtype=_index_type(len(records)))


def _repeated(firsts: np.ndarray) -> np.ndarray:
    """Whether each record has an equal one before it (``firsts`` from :func:`_firsts`), a block at a time."""
    repeated = np.empty(len(firsts), dtype=bool)
    for lo in _blocks(len(firsts)):
        block = firsts[lo:lo + BLOCK]
        repeated[lo:lo + len(block)] = block != np.arange(lo, lo + len(block), dtype=block.dtype)
    return repeated


def report_duplicates(records: TaskRecords, report: ConvertReport) -> None:
    """Count repeated texts and ids; list texts whose labels differ from the first occurrence, and
    every repeated task id (the CoNLL files would hold two sentences under one id)."""
    n = len(records)
    if not n:
        return
    digests = [np.frombuffer(records.digests_hi, dtype=np.uint64),
               np.frombuffer(records.digests_lo, dtype=np.uint64)]
    tags = np.frombuffer(records.tags, dtype=np.int64)
    text_first = _firsts(digests)
    repeated_text = _repeated(text_first)
    conflict = np.empty(n, dtype=bool)
    for lo in _blocks(n):
        firsts = text_first[lo:lo + BLOCK]
        conflict[lo:lo + len(firsts)] = repeated_text[lo:lo + BLOCK] & (tags[lo:lo + BLOCK] != tags[firsts])
    id_first = _id_firsts(records)
    repeated_id = _repeated(id_first)
    for key, flags in (("tasks_duplicate_text", repeated_text), ("tasks_duplicate_conflicting_labels", conflict),
                       ("tasks_duplicate_id", repeated_id)):
        if flags.any():  # a count appears only when there is something to count, as the report always did
            report.counts[key] += int(np.count_nonzero(flags))
    for lo in _blocks(n):
        for pos in (lo + np.flatnonzero(repeated_id[lo:lo + BLOCK] | conflict[lo:lo + BLOCK])).tolist():
            task_id = records.task_id(pos)
            if repeated_id[pos]:
                earlier = int(id_first[pos])
                same_text = all(half[earlier] == half[pos] for half in digests)
                report.spans.append({"task_id": task_id, "action": "reported",
                                     "reason": "duplicate_id" if same_text else "duplicate_id_different_text",
                                     "duplicate_of": records.task_id(earlier)})
            if conflict[pos]:
                report.spans.append({"task_id": task_id, "action": "reported", "reason": "duplicate_conflict",
                                     "duplicate_of": records.task_id(int(text_first[pos]))})
