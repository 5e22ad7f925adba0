"""The promote command: which model version the service serves (``paths.registry_dir``: models/).

    python -m pipeline promote --list          # every version ever registered, the served one marked
    python -m pipeline promote VERSION         # serve VERSION (a rollback is a promote of an older one)
    python -m pipeline promote --register      # register the exported model (paths.onnx_dir) and serve it

A running service (``python -m serve --model-dir models/served``) loads the new target on its next reload
check (``kill -HUP``, or Label Studio's ``/setup``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.core.errors import ParamsError
from pipeline.loop.registry import Registry

log = logging.getLogger(__name__)


def main(params: dict[str, Any], version: str | None = None, *, list_only: bool = False,
         register: bool = False) -> None:
    paths = params["paths"]
    registry = Registry(Path(paths["registry_dir"]))
    if list_only:
        served = registry.read()["served"]
        for entry in registry.versions():
            mark = "*" if entry["version"] == served else " "
            figures = f"dev F1 {entry['dev_f1']}, test F1 {entry['test_f1']}" if entry.get("dev_f1") is not None \
                else "no figures"
            log.info("%s %s  %s  (%s, %s)", mark, entry["version"], figures, entry.get("source"),
                     entry.get("experiment") or entry.get("commit") or "-")
        return
    if register:
        onnx_dir = Path(paths["onnx_dir"])
        info = json.loads((onnx_dir / "model_info.json").read_text(encoding="utf-8"))
        version = info["model_version"]
        if not any(e["version"] == version for e in registry.versions()):
            registry.add(onnx_dir, {"version": version, "source": "pipeline"})
    if not version:
        raise ParamsError("promote: name a VERSION, or pass --list or --register")
    registry.promote(version, reason="python -m pipeline promote")
    log.info("serving %s (%s -> %s)", version, registry.served_link, registry.get(version)["folder"])
