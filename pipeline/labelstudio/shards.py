"""Predictions as shards: ``part-00000.json``, ``part-00001.json`` … plus ``manifest.json``, in one folder.

Each shard is a Label Studio import file (a JSON list of tasks with ``predictions``, one task per line) of at
most ``shard_size`` tasks; the manifest lists the shards in order with their task and entity counts and
sha256, and says what they were made from (input file hash, model version and hash, settings).

Writing (``ShardWriter``) happens in a work folder beside the output, ``.NAME.partial/``: each shard is written
atomically, and ``progress.json`` there records the finished shards and the run they belong to. A run that
was interrupted (Ctrl-C, kill -9) finds them and continues after the last finished one; another input, model
or setting starts over. When the last shard is written, the manifest is added and the work folder replaces
the output in two renames: a reader sees the previous predictions or the new ones, never a mix.

Reading (``Predictions``) takes such a folder, or a single import file (JSON list or JSON Lines) as before,
and yields its tasks with one shard in memory at most, checking each shard against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Any

from pipeline.core.atomic import atomic_open, replace_dir, sweep_stale, write_json
from pipeline.core.errors import PipelineError
from pipeline.labelstudio.tasks import iter_export

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
FORMAT = "label-studio-prediction-shards/1"
# what an output folder of the single-file layout held (predictions in tasks.json, DVC's .gitignore for it)
LEGACY_FILES = frozenset({"tasks.json", ".gitignore"})


def shard_name(index: int) -> str:
    return f"part-{index:05d}.json"


def work_dir(out: str | Path) -> Path:
    """Where a run writes its shards before they replace ``out`` (kept across interruptions)."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def task_line(task: dict[str, Any]) -> str:
    """One task as a line of a shard (no raw newline: JSON escapes it)."""
    return json.dumps(task, ensure_ascii=False)


def check_output(out: str | Path) -> None:
    """Refuse an output path that is a file or a folder of other things: the finished folder replaces it."""
    out = Path(out)
    if out.is_file() or out.name.endswith((".json", ".jsonl")):
        raise PipelineError(f"{out}: predictions are a folder of shards and {MANIFEST} now, not one file; "
                            "give a folder (paths.predictions, --out)")
    if out.is_dir():
        names = {p.name for p in out.iterdir()}
        if MANIFEST not in names and not names <= LEGACY_FILES:
            raise PipelineError(f"{out} holds other files ({', '.join(sorted(names)[:3])}) and no {MANIFEST}: the "
                                "finished predictions replace the whole folder, so give a new or empty one")


class ShardWriter(AbstractContextManager):
    """Tasks in, shards out; ``key`` names the run (what the shards are made from) for resuming."""

    def __init__(self, out: str | Path, key: dict[str, Any], shard_size: int) -> None:
        self.out = Path(out)
        self.work = work_dir(self.out)
        self.key = json.loads(json.dumps(key))  # as it reads back from progress.json
        self.shard_size = shard_size
        self.shards: list[dict[str, Any]] = self._resume()
        self._file: AbstractContextManager[IO[bytes]] | None = None
        self._fh: IO[bytes] | None = None
        self._hash = hashlib.sha256()
        self._tasks = self._entities = 0

    @property
    def done(self) -> int:
        """Tasks in finished shards: where this run starts."""
        return sum(s["tasks"] for s in self.shards)

    def _resume(self) -> list[dict[str, Any]]:
        kept: list[dict[str, Any]] = []
        progress = self.work / PROGRESS
        if progress.is_file():
            try:
                state = json.loads(progress.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                state = {}
            if state.get("key") == self.key:
                for shard in state.get("shards", []):
                    path = self.work / shard["file"]
                    if not path.is_file() or file_sha256(path) != shard["sha256"]:
                        break
                    kept.append(shard)
            else:
                log.info("%s: shards of another input, model or setting; starting over", self.work)
        if self.work.is_dir() and not self.work.is_symlink():
            keep = {s["file"] for s in kept}
            for path in self.work.iterdir():
                if path.name in keep:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        elif self.work.exists():
            self.work.unlink()
        self.work.mkdir(parents=True, exist_ok=True)
        if kept:
            log.info("resuming after %d finished shards (%d tasks) in %s", len(kept), sum(s["tasks"] for s in kept),
                     self.work)
        self._record(kept)
        return kept

    def _record(self, shards: list[dict[str, Any]]) -> None:
        write_json(self.work / PROGRESS, {"key": self.key, "shards": shards})

    def add(self, task: dict[str, Any], entities: int = 0) -> None:
        """Append one task to the open shard; a full shard is closed (renamed into place) and recorded."""
        self.add_json(task_line(task), entities)

    def add_json(self, line: str, entities: int = 0) -> None:
        """``add`` for a task already written as ``task_line`` (e.g. by a Ray worker)."""
        if self._fh is None:
            self._file = atomic_open(self.work / shard_name(len(self.shards)), "wb")
            self._fh = self._file.__enter__()
            self._hash = hashlib.sha256()
        self._write((b"[\n" if self._tasks == 0 else b",\n") + line.encode("utf-8"))
        self._tasks += 1
        self._entities += entities
        if self._tasks == self.shard_size:
            self._close()

    def _write(self, data: bytes) -> None:
        assert self._fh is not None  # noqa: S101
        self._fh.write(data)
        self._hash.update(data)

    def _close(self) -> None:
        assert self._file is not None  # noqa: S101
        self._write(b"\n]\n")
        self._file.__exit__(None, None, None)
        self.shards.append({"file": shard_name(len(self.shards)), "tasks": self._tasks, "entities": self._entities,
                            "sha256": self._hash.hexdigest()})
        self._file = self._fh = None
        self._tasks = self._entities = 0
        self._record(self.shards)

    def finish(self, about: dict[str, Any]) -> dict[str, Any]:
        """Close the last shard, write the manifest (``about`` first) and put the folder in place of ``out``."""
        if self._fh is not None:
            self._close()
        manifest = {"format": FORMAT, **about, "shard_size": self.shard_size,
                    "tasks": sum(s["tasks"] for s in self.shards),
                    "entities": sum(s["entities"] for s in self.shards), "shards": self.shards}
        write_json(self.work / MANIFEST, manifest)
        (self.work / PROGRESS).unlink()
        sweep_stale(self.out)
        replace_dir(self.work, self.out)
        return manifest

    def __exit__(self, *exc: Any) -> None:
        if self._file is not None:  # left inside a shard: its temp file goes, the finished ones stay
            error = exc[1] if exc[1] is not None else RuntimeError("shard not finished")
            self._file.__exit__(type(error), error, None)
            self._file = self._fh = None


class Predictions:
    """The tasks of a predictions folder (shards in manifest order) or of one import file, as a stream.

    Iterable again and again (push reads it twice: check, then send); ``total`` is the task count when a
    manifest gives it, else None.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest: dict[str, Any] | None = None
        if self.path.is_dir():
            manifest = self.path / MANIFEST
            if not manifest.is_file():
                raise PipelineError(f"{self.path} has no {MANIFEST}: not a finished predict output; run predict "
                                    "(again) to finish it")
            self.manifest = json.loads(manifest.read_text(encoding="utf-8"))
        elif not self.path.is_file():
            raise PipelineError(f"{self.path} not found; run `dvc repro` (predict stage) first")
        self.total: int | None = self.manifest["tasks"] if self.manifest else None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.manifest is None:
            yield from iter_export(self.path)
            return
        for shard in self.manifest["shards"]:
            path = self.path / shard["file"]
            if not path.is_file():
                raise PipelineError(f"{path} is missing (listed in {MANIFEST}); run predict again")
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                raise PipelineError(f"{path} is not the file predict wrote (sha256 differs from {MANIFEST}); "
                                    "run predict again")
            yield from json.loads(data)
            del data
