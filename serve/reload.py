"""Model hot reload: load the model folder again when it changed, then swap the runtime in one assignment.

The folder's fingerprint is the name, size and modification time of each file
in it (an export rewrites them all; ``model_info.json`` carries the new
``model_version``). A reload loads and warms the new runtime on the calling
thread while the old one keeps serving, then assigns it to the batcher: the
batch in flight finishes on the old runtime, the next batch uses the new one.
A folder that changes while it loads (an export still writing) or fails to
load leaves the old model in place; the next check tries again.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(model_dir: Path) -> Fingerprint:
    """(name, size, mtime_ns) of every file in the folder, sorted, after the folder's resolved path (a
    ``models/served`` link swapped to another version changes it); empty if the folder is gone."""
    try:
        entries = list(model_dir.iterdir())
    except OSError:
        return ()
    out = [(os.path.realpath(model_dir), 0, 0)]
    for path in entries:
        try:
            st = path.stat()
        except OSError:  # removed between listing and stat: the folder is being rewritten
            continue
        if path.is_file():
            out.append((path.name, st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


@dataclass(frozen=True)
class ReloadResult:
    reloaded: bool
    model_version: str
    previous_version: str
    error: str | None = None


class ModelReloader:
    """Checks a model folder and swaps a fresh runtime into ``target.runtime`` when it changed."""

    def __init__(self, model_dir: str | Path, load: Callable[[Path], Any], target: Any,
                 on_reload: Callable[[ReloadResult], None] | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.load = load
        self.target = target  # anything with a ``runtime`` attribute (the batcher)
        self.on_reload = on_reload
        self._lock = threading.Lock()
        self._seen = fingerprint(self.model_dir)
        self._failed: Fingerprint | None = None  # a folder state that did not load: a poll does not retry it

    def changed(self) -> bool:
        return fingerprint(self.model_dir) != self._seen

    def worth_a_check(self) -> bool:
        """Changed since the last load, and not into the very state that last failed to load (for polling)."""
        now = fingerprint(self.model_dir)
        return now != self._seen and now != self._failed

    def check(self) -> ReloadResult:
        """Reload if the folder changed since the last (successful) load. Thread-safe, one reload at a time."""
        with self._lock:
            current = self.target.runtime.model_version
            before = fingerprint(self.model_dir)
            if before == self._seen:
                return ReloadResult(False, current, current)
            try:
                runtime = self.load(self.model_dir)
                runtime.predict(["warm up the new model"])  # ORT builds its kernels on the first run
            except Exception as exc:  # noqa: BLE001 - a broken folder must not take the service down
                self._failed = before
                result = ReloadResult(False, current, current, f"{type(exc).__name__}: {exc}")
                log.error("model folder %s changed but did not load (%s); still serving %s",
                          self.model_dir, result.error, current)
                self._report(result)
                return result
            if fingerprint(self.model_dir) != before:
                result = ReloadResult(False, current, current, "model folder changed while loading")
                log.warning("model folder %s changed while loading; still serving %s, will retry",
                            self.model_dir, current)
                self._report(result)
                return result
            self.target.runtime = runtime  # the swap: one reference assignment
            self._seen = before
            result = ReloadResult(True, runtime.model_version, current)
            log.info("reloaded model from %s: %s (was %s)", self.model_dir, runtime.model_version, current)
            self._report(result)
            return result

    def _report(self, result: ReloadResult) -> None:
        if self.on_reload is not None:
            self.on_reload(result)
