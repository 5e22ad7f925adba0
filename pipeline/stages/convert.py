"""The convert stage and the pull command: an export file (or a live project) into data/conll and its report.

``main()`` reads its params once and hands the engine the validated ``ConvertConfig``.
"""

from __future__ import annotations

import logging
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.core.atomic import atomic_open
from pipeline.core.config import ConvertConfig
from pipeline.core.errors import ConversionError
from pipeline.labelstudio.convert import run

log = logging.getLogger(__name__)


def main(params: dict[str, Any], engine: str | None = None, project: int | None = None) -> None:
    """Convert the export file, or (``--project``) a live project's export pulled through the SDK."""
    paths, conf = params["paths"], ConvertConfig.from_params(params)
    engine = engine or conf.engine
    if engine == "exact":
        convert_file = partial(run, workers=conf.workers)
    elif engine == "ls-converter":
        from pipeline.labelstudio.ls_converter import run as convert_file
    else:
        raise ConversionError(f"unknown engine {engine!r}; use 'exact' or 'ls-converter'", field="convert.engine")
    if project is None:
        convert_file(paths["export"], paths["label_config"], paths["conll_dir"], paths["convert_report"], policies=conf)
        return
    from pipeline.labelstudio.client import LabelStudioClient

    client = LabelStudioClient.from_env()
    with tempfile.TemporaryDirectory() as tmp:
        export_path, config_path = Path(tmp) / "export.json", Path(tmp) / "label_config.xml"
        client.export_snapshot(project, export_path)
        config_path.write_text(client.label_config_xml(project), encoding="utf-8")
        convert_file(export_path, config_path, paths["conll_dir"], paths["convert_report"], policies=conf)


def pull(params: dict[str, Any], project: int) -> None:
    """Snapshot a live project into the export file and label config that ``dvc repro`` reads."""
    from pipeline.labelstudio.client import LabelStudioClient

    paths = params["paths"]
    client = LabelStudioClient.from_env()
    client.export_snapshot(project, paths["export"])
    with atomic_open(paths["label_config"]) as fh:
        fh.write(client.label_config_xml(project).rstrip("\n") + "\n")
    log.info("project %d -> %s and %s; run `dvc repro` next", project, paths["export"], paths["label_config"])
