"""Export -> CoNLL speed and peak memory: ours vs ``label_studio_sdk.converter``, same file, same run.

Builds a synthetic export by repeating the sample's tasks under new ids (the
200k default is ~210 MB), then converts it in a fresh process per engine so
each peak RSS is the engine's own. Ours runs as the pipeline does (one process
per core for a large file); its peak counts the parent plus every worker at
its own peak, all at once. ``ours_one_pass`` is ours in one process (``workers=1``): the parallel
output must be byte-identical to it (``identical_to_one_pass``). Writes benchmarks/results/convert.json.

    .venv/bin/python benchmarks/convert.py                  # 200k tasks, all three
    .venv/bin/python benchmarks/convert.py --tasks 20000    # quicker look
    .venv/bin/python benchmarks/convert.py --tasks 1000000 --engines ours ours_one_pass \
        --out benchmarks/results/convert-1m.json            # ~1 GB export (issue 20's figure)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.core.cpu import cpu_info

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "labelstudio" / "export.json"
CONFIG = ROOT / "data" / "labelstudio" / "label_config.xml"

log = logging.getLogger("benchmarks.convert")

# Each engine runs in its own interpreter; it prints its wall time and peak RSS as JSON.
RUNNERS = {
    "ours": """
from pipeline.labelstudio.convert import run
import logging; logging.disable(logging.INFO)
run(EXPORT, CONFIG, OUT + "/conll", OUT + "/report.json", workers=0)  # as the pipeline runs it
""",
    "ours_one_pass": """
from pipeline.labelstudio.convert import run
import logging; logging.disable(logging.INFO)
run(EXPORT, CONFIG, OUT + "/conll", OUT + "/report.json", workers=1)
""",
    "ls_converter": """
from label_studio_sdk.converter import Converter
c = Converter(config=open(CONFIG).read(), project_dir=None, download_resources=False)
c.convert_to_conll2003(EXPORT, OUT + "/ls", is_dir=False)
""",
}
WRAPPER = """
import json, resource, sys, time
EXPORT, CONFIG, OUT = sys.argv[1:4]
start = time.perf_counter()
{body}
seconds = time.perf_counter() - start
import os
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
# worst case: the parent and every worker at their peaks at once
print(json.dumps({{"seconds": seconds, "peak_rss_mb": own + child * (os.cpu_count() if child else 0),
                  "parent_peak_mb": own, "worker_peak_mb": child}}))
"""


def build_export(path: Path, n_tasks: int) -> int:
    """Write ``n_tasks`` tasks cycling over the sample (streamed, so the builder stays small)."""
    sample = json.loads(SAMPLE.read_text(encoding="utf-8"))
    with path.open("w", encoding="utf-8") as fh:
        fh.write("[\n")
        for i in range(n_tasks):
            task = dict(sample[i % len(sample)], id=i + 1)
            fh.write(json.dumps(task, ensure_ascii=False))
            fh.write(",\n" if i + 1 < n_tasks else "\n")
        fh.write("]\n")
    return path.stat().st_size


def run_engine(name: str, export: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    code = WRAPPER.format(body=RUNNERS[name])
    proc = subprocess.run([sys.executable, "-c", code, str(export), str(CONFIG), str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def output_digest(out: Path) -> str:
    """One sha256 over every file ours wrote (the CoNLL folder and the report), by relative path."""
    digest = hashlib.sha256()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(out)).encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=1, help="runs per engine; the fastest counts")
    parser.add_argument("--engines", nargs="+", choices=list(RUNNERS), default=list(RUNNERS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "convert.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export = Path(tmp) / "export.json"
        start = time.perf_counter()
        size = build_export(export, args.tasks)
        log.info("synthetic export: %d tasks, %.0f MB (built in %.1f s)", args.tasks, size / 2**20,
                 time.perf_counter() - start)
        results = {}
        digests = {}
        for name in args.engines:
            runs = [run_engine(name, export, Path(tmp) / name) for _ in range(args.repeats)]
            if name.startswith("ours"):
                digests[name] = output_digest(Path(tmp) / name)
            best = min(runs, key=lambda r: r["seconds"])
            best["tasks_per_s"] = round(args.tasks / best["seconds"])
            best["seconds"] = round(best["seconds"], 2)
            for key in ("peak_rss_mb", "parent_peak_mb", "worker_peak_mb"):
                best[key] = round(max(r[key] for r in runs), 1)
            results[name] = best
            log.info("%-13s %7.2f s  %8d tasks/s  peak %6.1f MB", name, best["seconds"], best["tasks_per_s"],
                     best["peak_rss_mb"])
    report = {
        "cpu": cpu_info(),
        "tasks": args.tasks,
        "export_mb": round(size / 2**20, 1),
        "results": results,
        "targets": {"speedup_vs_ls_converter": 5.0, "peak_rss_mb": 300, "per_process_peak_mb": 100},
    }
    if "ours" in results and "ls_converter" in results:
        report["speedup_vs_ls_converter"] = round(
            results["ours"]["tasks_per_s"] / results["ls_converter"]["tasks_per_s"], 2)
        log.info("ours / ls_converter throughput: %.2fx", report["speedup_vs_ls_converter"])
    if "ours" in results:
        ours = results["ours"]
        report["per_process_peak_mb"] = max(ours["parent_peak_mb"], ours["worker_peak_mb"])
    if {"ours", "ours_one_pass"} <= digests.keys():
        report["identical_to_one_pass"] = digests["ours"] == digests["ours_one_pass"]
        report["speedup_vs_one_pass"] = round(ours["tasks_per_s"] / results["ours_one_pass"]["tasks_per_s"], 2)
        log.info("parallel output identical to one pass: %s", report["identical_to_one_pass"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
