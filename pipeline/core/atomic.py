"""Write files so that a crash never leaves a partial file where a good one stood.

Temp files and folders are siblings named ``.NAME.tmp-PID-XXXX``: a run killed
with ``kill -9`` leaves one behind, and the next write of the same path removes
those whose process is gone (and puts back ``.NAME.old`` if the kill landed
between the two renames of a folder swap). ``.gitignore`` hides the pattern.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale(path: Path) -> None:
    """Remove temp siblings of ``path`` left by dead processes; restore ``.NAME.old`` if ``path`` is missing."""
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():
        log.warning("restoring %s from %s (a swap was interrupted)", path, old.name)
        os.replace(old, path)
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        pid = leftover.name[len(f".{path.name}.tmp-"):].partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by a killed run", leftover)
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), dir=path.parent)
    os.chmod(tmp, 0o644)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    with atomic_open(path) as fh:
        json.dump(data, fh, ensure_ascii=False, indent=indent)
        fh.write("\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temp name; swap it in place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: str | Path, path: str | Path) -> None:
    """Put the finished folder ``src`` (a sibling of ``path``) in place of ``path``: two renames, the old
    folder kept as ``.NAME.old`` between them (``sweep_stale`` puts it back if a kill lands there)."""
    src, path = Path(src), Path(path)
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(src, path)
    if old is not None:
        shutil.rmtree(old)
