"""Atomic writes: a killed run leaves the old output, its temp files are git-ignored and cleaned next time."""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline.core.atomic import atomic_dir, atomic_open, sweep_stale
from tests.conftest import ROOT

KILLED_MID_WRITE = """
import os, sys
from pipeline.core.atomic import atomic_dir, atomic_open
with atomic_dir(sys.argv[1]) as out:
    (out / "part.conll").write_text("half")
    with atomic_open(sys.argv[2]) as fh:
        fh.write("half")
        os.kill(os.getpid(), 9)
"""


def test_a_killed_write_keeps_the_old_output_and_the_next_write_cleans_up(tmp_path):
    conll, report = tmp_path / "data" / "conll", tmp_path / "reports" / "convert.json"
    with atomic_dir(conll) as out:
        (out / "train.conll").write_text("good")
    with atomic_open(report) as fh:
        fh.write("good")

    proc = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(conll), str(report)], cwd=ROOT)
    assert proc.returncode == -9
    leftovers = sorted(p.name for p in (*conll.parent.iterdir(), *report.parent.iterdir()) if p.name.startswith("."))
    assert len(leftovers) == 2 and all(".tmp-" in name for name in leftovers)
    assert (conll / "train.conll").read_text() == "good" and report.read_text() == "good"
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "data/" + leftovers[0]], cwd=ROOT,
                             capture_output=True, text=True)
    assert ignored.returncode == 0, "git status would show the leftover"

    with atomic_dir(conll) as out:
        (out / "train.conll").write_text("new")
    with atomic_open(report) as fh:
        fh.write("new")
    assert [p.name for p in conll.parent.iterdir()] == ["conll"]
    assert [p.name for p in report.parent.iterdir()] == ["convert.json"]


def test_a_swap_killed_between_its_renames_is_put_back(tmp_path):
    conll = tmp_path / "conll"
    with atomic_dir(conll) as out:
        (out / "train.conll").write_text("good")
    os.replace(conll, tmp_path / ".conll.old")  # the first rename happened, the second did not
    sweep_stale(conll)
    assert (conll / "train.conll").read_text() == "good"


def test_temp_files_of_a_live_process_are_left_alone(tmp_path):
    target = tmp_path / "tasks.json"
    busy = tmp_path / f".tasks.json.tmp-{os.getppid()}-abc"  # our parent is alive
    busy.write_text("in progress")
    sweep_stale(target)
    assert busy.exists()
