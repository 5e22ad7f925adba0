"""Run under the project's ``.venv`` when DVC started a stage with another ``python`` from PATH (stdlib only).

DVC runs each stage's ``cmd`` with whatever ``python`` the shell finds, so ``.venv/bin/dvc repro`` from a shell
without the virtualenv on PATH would reach the system interpreter. When that interpreter lacks the project's
packages and ``.venv`` exists, the same command line is re-run under ``.venv/bin/python``; otherwise one line
says what is missing. Nothing changes when the interpreter has the packages (an activated venv, conda, a
container).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

#: Imported by the stages; if the interpreter lacks them, it is not the project's environment.
STAGE_PACKAGES = ("yaml", "tqdm", "numpy", "tokenizers", "onnxruntime", "torch", "dvclive")
VENV = Path(__file__).resolve().parents[2] / ".venv"  # pipeline/core/ -> the project root


def ensure_project_interpreter() -> None:
    missing = [name for name in STAGE_PACKAGES if importlib.util.find_spec(name) is None]
    if not missing:
        return
    python = VENV / "bin" / "python"
    if python.is_file() and Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(python, [str(python), *sys.orig_argv[1:]])
    sys.stderr.write(f"{sys.executable} lacks the project's packages ({', '.join(missing)}): run `make setup` "
                     "and use .venv/bin/python, or activate the environment you installed into\n")
    sys.exit(2)
