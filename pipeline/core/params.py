"""Read ``params.yaml``: the one place where every knob and path is declared.

Only ``main()`` functions call this; workers take plain arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import ParamsError

DEFAULT_PARAMS = Path("params.yaml")


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (run from the project root or pass --params)")
    with path.open(encoding="utf-8") as fh:
        params = yaml.safe_load(fh)
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return params


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """Return one section, with an error that names it when it is missing."""
    value = params.get(name)
    if not isinstance(value, dict):
        raise ParamsError(f"params.yaml: section {name!r} is missing or not a mapping")
    return value
