"""Every model version that was ever served, and which one is served now: ``models/registry.json``.

A version's folder is written once, beside the others (``models/versions/<version>/``), and never over an
existing one. What the service loads is ``models/served``, a relative symlink to one of them: promotion (or a
rollback, ``python -m pipeline promote VERSION``) writes a new link and renames it over the old one, an atomic
swap the service's hot reload picks up. The registry file is rewritten atomically too; it holds figures and
provenance (experiment, commit, data snapshot hash), never a secret.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.atomic import atomic_dir, write_json
from pipeline.core.errors import PipelineError

VERSION_FIELDS = ("version", "experiment", "commit", "data_hash", "dev_f1", "test_f1", "source")


class RegistryError(PipelineError):
    """An unknown version, or a registry file that does not parse."""


@dataclass(frozen=True)
class Registry:
    """The registry of one project: ``root`` is the models folder (``models/``)."""

    root: Path

    @property
    def path(self) -> Path:
        return self.root / "registry.json"

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def served_link(self) -> Path:
        return self.root / "served"

    def read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {"served": None, "versions": [], "promotions": []}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise RegistryError(f"{self.path} is not valid JSON ({exc}); restore it from the version folders") \
                from None
        return data

    def versions(self) -> list[dict[str, Any]]:
        return list(self.read()["versions"])

    def get(self, version: str) -> dict[str, Any]:
        for entry in self.versions():
            if entry["version"] == version:
                return entry
        known = ", ".join(e["version"] for e in self.versions()) or "none yet"
        raise RegistryError(f"no model version {version!r} in {self.path} (known: {known})")

    def served(self) -> dict[str, Any] | None:
        name = self.read()["served"]
        return self.get(name) if name else None

    def add(self, model_dir: str | Path, entry: dict[str, Any]) -> dict[str, Any]:
        """Copy an exported model folder in as a new version (never over one) and list it, not yet served."""
        version = str(entry["version"])
        data = self.read()
        if any(e["version"] == version for e in data["versions"]):
            raise RegistryError(f"model version {version!r} is already registered; versions are never rewritten")
        folder = self.versions_dir / version
        if folder.exists():
            raise RegistryError(f"{folder} exists but is not in {self.path}; move it away to register {version}")
        with atomic_dir(folder) as tmp:
            shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        record = {k: entry.get(k) for k in VERSION_FIELDS} | {
            "folder": folder.relative_to(self.root).as_posix(), "registered_at": _now()}
        data["versions"].append(record)
        write_json(self.path, data)
        return record

    def promote(self, version: str, reason: str = "") -> dict[str, Any]:
        """Serve ``version``: swap the ``served`` link atomically, then record it."""
        entry = self.get(version)
        folder = self.root / entry["folder"]
        if not folder.is_dir():
            raise RegistryError(f"{folder} of version {version!r} is gone; it cannot be served")
        tmp = self.root / f".served.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(Path(entry["folder"]), tmp, target_is_directory=True)
        os.replace(tmp, self.served_link)
        data = self.read()
        previous = data["served"]
        data["served"] = version
        data["promotions"].append({"version": version, "previous": previous, "at": _now(), "reason": reason})
        write_json(self.path, data)
        return entry


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
