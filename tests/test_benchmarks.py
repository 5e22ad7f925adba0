"""Every benchmark script starts as the README shows it (``.venv/bin/python benchmarks/NAME.py``) from a fresh
shell: its imports resolve (benchmarks/serve.py once could not import the load generator) and its options parse.
The benchmarks themselves take minutes to an hour of a quiet machine and are not run here."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, fresh_shell

SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")
                 if 'if __name__ == "__main__":' in p.read_text(encoding="utf-8"))


def test_the_benchmarks_folder_has_its_scripts():
    assert {"inference.py", "serve.py", "train.py", "convert.py", "tune_compare.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_benchmark_script_starts_from_a_fresh_shell(script):
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=fresh_shell(dict(os.environ)), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage:"), proc.stdout[:500]
