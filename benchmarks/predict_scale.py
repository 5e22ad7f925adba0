"""Pre-annotation at scale: tasks/s and peak memory of in-memory, streaming and Ray predict, same run.

Builds exports of the sample's texts cycled under new ids (every task unlabeled), then runs each engine in a
fresh process per (engine, precision, size):

- ``in_memory``: what predict did before streaming: ``json.load`` of the whole export, every prediction in a
  list, one JSON file written at the end (``preannotate.predict_tasks``, the reference the stream matches);
- ``stream``: the predict stage with ``predict.engine: local`` (shards written as they go);
- ``ray``: the predict stage with ``predict.engine: ray``, a local Ray with ``--ray-cpus`` CPUs.

Peak memory is the peak of the summed RSS of the process and all its descendants (Ray's raylet, GCS and
workers included), sampled every 50 ms. Rates are tasks/s over the stage's whole run (reading, counting,
predicting, writing). Needs the exported model (``make repro``). Writes benchmarks/results/predict_scale.json.

    .venv/bin/python benchmarks/predict_scale.py                           # the defaults below
    .venv/bin/python benchmarks/predict_scale.py --tasks 2000 --sizes 2000  # a quick look
    .venv/bin/python benchmarks/predict_scale.py --repeats 2                # each engine twice, median counts
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from pipeline.core.cpu import cpu_info

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "labelstudio" / "export.json"
CONFIG = ROOT / "data" / "labelstudio" / "label_config.xml"
ONNX = ROOT / "models" / "onnx"

log = logging.getLogger("benchmarks.predict_scale")

# Each run is a fresh interpreter: sys.argv = [engine, export, out, quantized, ray_cpus]; prints its seconds.
CHILD = """
import json, logging, sys, time
engine, export, out, quantized, ray_cpus = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", int(sys.argv[5])
logging.basicConfig(level=logging.WARNING)
from pipeline.core.params import load_params
params = load_params({params!r})
params["paths"].update(export=export, predictions=out, onnx_dir={onnx!r}, label_config={config!r})
params["predict"].update(quantized=quantized, engine="ray" if engine == "ray" else "local")
start = time.perf_counter()
if engine == "in_memory":
    from pipeline.core.config import PredictConfig
    from pipeline.labelstudio.labelconfig import read_label_config
    from pipeline.labelstudio.preannotate import predict_tasks, select_tasks
    from pipeline.runtime.inference import NerRuntime
    conf = PredictConfig.from_params(params)
    runtime = NerRuntime({onnx!r}, quantized=conf.quantized, threads=conf.threads, max_tokens=conf.max_tokens,
                         batch_size=conf.batch_size)
    with open(export, encoding="utf-8") as fh:
        tasks = list(select_tasks(json.load(fh), conf.tasks))
    done = predict_tasks(runtime, tasks, read_label_config({config!r}), uncertainty=conf.uncertainty)
    with open(out + ".json", "w", encoding="utf-8") as fh:
        json.dump(done, fh, ensure_ascii=False)
else:
    if engine == "ray":
        import ray
        ray.init(num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False)
    from pipeline.stages.predict import main
    main(params)
print(json.dumps({{"seconds": time.perf_counter() - start}}))
"""


def build_export(path: Path, n_tasks: int) -> int:
    """``n_tasks`` unlabeled tasks cycling over the sample's texts, with new ids (streamed to disk)."""
    sample = json.loads(SAMPLE.read_text(encoding="utf-8"))
    with path.open("w", encoding="utf-8") as fh:
        fh.write("[\n")
        for i in range(n_tasks):
            task = {"id": i + 1, "data": sample[i % len(sample)]["data"]}
            fh.write(json.dumps(task, ensure_ascii=False))
            fh.write(",\n" if i + 1 < n_tasks else "\n")
        fh.write("]\n")
    return path.stat().st_size


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_one(engine: str, export: Path, out: Path, quantized: bool, ray_cpus: int) -> dict:
    code = CHILD.format(params=str(ROOT / "params.yaml"), onnx=str(ONNX), config=str(CONFIG))
    env = dict(os.environ, RAY_ADDRESS="")  # always a local Ray here, whatever the shell says
    proc = subprocess.Popen([sys.executable, "-c", code, engine, str(export), str(out), "1" if quantized else "0",
                             str(ray_cpus)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    peak, watcher = 0, psutil.Process(proc.pid)

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            try:
                peak = max(peak, tree_rss(watcher))
            except psutil.Error:
                return
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    stdout, stderr = proc.communicate()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"{engine} failed:\n{stderr[-3000:]}")
    return {"seconds": json.loads(stdout.strip().splitlines()[-1])["seconds"], "peak_rss_mb": peak / 2**20}


def shard_tasks(out: Path) -> list[str]:
    """Each task of a run's output as one JSON line: in-memory's one list, or the shards in order."""
    if out.with_suffix(".json").is_file():
        return [json.dumps(t, ensure_ascii=False, sort_keys=True)
                for t in json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))]
    lines = []
    for part in sorted(out.glob("part-*.json")):
        lines += [json.dumps(t, ensure_ascii=False, sort_keys=True)
                  for t in json.loads(part.read_text(encoding="utf-8"))]
    return lines


def measure(engines: list[str], size: int, precision: str, tmp: Path, ray_cpus: int, repeats: int = 1) -> dict:
    """Each engine ``repeats`` times, the order reversed every other round (a shared box's speed drifts by
    10-20% over minutes: one run each, in one order, mistakes that drift for an engine's cost). The rate is
    the median run's; peak memory is the highest."""
    export = tmp / f"export-{size}.json"
    if not export.exists():
        mb = build_export(export, size) / 2**20
        log.info("export: %d tasks, %.0f MB", size, mb)
    seconds: dict[str, list[float]] = {e: [] for e in engines}
    peaks: dict[str, float] = dict.fromkeys(engines, 0.0)
    reference, same = None, True
    for round_ in range(repeats):
        for engine in engines if round_ % 2 == 0 else engines[::-1]:
            out = tmp / f"out-{engine}-{precision}-{size}-{round_}"
            row = run_one(engine, export, out, precision == "int8", ray_cpus)
            seconds[engine].append(row["seconds"])
            peaks[engine] = max(peaks[engine], row["peak_rss_mb"])
            tasks = shard_tasks(out)
            reference = tasks if reference is None else reference
            same = same and tasks == reference
            shutil.rmtree(out, ignore_errors=True)
            out.with_suffix(".json").unlink(missing_ok=True)
            log.info("%-5s %7d tasks  %-9s %8.1f tasks/s  peak %6.1f MB", precision, size, engine,
                     size / row["seconds"], row["peak_rss_mb"])
    rows: dict = {}
    for engine in engines:
        median = statistics.median(seconds[engine])
        rows[engine] = {"seconds": round(median, 2), "tasks_per_s": round(size / median, 1),
                        "runs_tasks_per_s": [round(size / s, 1) for s in seconds[engine]],
                        "peak_rss_mb": round(peaks[engine], 1)}
    rows["same_tasks_and_predictions"] = same
    return rows


def ratios(rows: dict) -> dict:
    out = {}
    if {"stream", "in_memory"} <= rows.keys():
        out["stream_vs_in_memory"] = round(rows["stream"]["tasks_per_s"] / rows["in_memory"]["tasks_per_s"], 3)
    if {"ray", "stream"} <= rows.keys():
        out["ray_vs_stream"] = round(rows["ray"]["tasks_per_s"] / rows["stream"]["tasks_per_s"], 3)
    return out


def projection(results: dict, ray_cpus: int) -> dict:
    """A 1M-task run on N machines from the measured Ray rate per worker (assumptions in the JSON)."""
    out = {}
    for precision, by_size in results.items():
        with_ray = [size for size, rows in by_size.items() if "ray" in rows]
        if not with_ray:
            continue
        largest = by_size[max(with_ray, key=int)]  # the streaming-only sizes have no Ray row
        per_worker = largest["ray"]["tasks_per_s"] / ray_cpus
        out[precision] = {"per_worker_tasks_per_s": round(per_worker, 1), "hours_for_1m_tasks": {
            f"{n}_machines_x_{cores}_cores": round(1e6 / (per_worker * n * cores) / 3600, 2)
            for n, cores in ((1, 2), (1, 16), (4, 16), (16, 16))}}
    out["assumptions"] = (
        "one worker per core (one ORT intra-op thread each), each as fast as one of this box's workers; "
        "rate scales linearly with workers (ORT inference is embarrassingly parallel across tasks; the driver's "
        "shard writing ran at well over the predict rate here); input and model on a shared path read by every "
        "node; the cluster's CPUs of this class (see cpu); Ray's start-up (seconds) and the data transfer to "
        "the driver not counted")
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=50_000, help="size for the engine comparison")
    parser.add_argument("--sizes", type=int, nargs="*", default=[200_000],
                        help="more sizes, streaming only (memory stays flat whatever the input size)")
    parser.add_argument("--engines", nargs="+", default=["in_memory", "stream", "ray"],
                        choices=["in_memory", "stream", "ray"])
    parser.add_argument("--precisions", nargs="+", default=["int8", "fp32"], choices=["int8", "fp32"])
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per engine, order reversed every other round; the median run counts")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "predict_scale.json"))
    args = parser.parse_args()
    if not (ONNX / "model.onnx").is_file():
        raise SystemExit(f"{ONNX / 'model.onnx'} is missing: run `make repro` first")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions:
            results[precision] = {str(args.tasks): measure(args.engines, args.tasks, precision, Path(tmp),
                                                           args.ray_cpus, args.repeats)}
            results[precision][str(args.tasks)]["ratios"] = ratios(results[precision][str(args.tasks)])
        for size in (s for s in args.sizes if s != args.tasks):  # --tasks already measured the stream there
            results[args.precisions[0]][str(size)] = measure(["stream"], size, args.precisions[0], Path(tmp),
                                                             args.ray_cpus)
    report = {
        "cpu": cpu_info(), "cpu_count": os.cpu_count(), "ray_cpus": args.ray_cpus, "repeats": args.repeats,
        "units": "tasks/s, MB",
        "results": results, "projection": projection(results, args.ray_cpus),
        "targets": {"stream_vs_in_memory": 0.95, "stream_peak_rss_mb": 300, "ray_vs_stream": 0.8},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
