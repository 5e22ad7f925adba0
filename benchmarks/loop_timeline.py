"""The labelling loop on the sample, timed: *Start Training* in a real Label Studio to a promoted model, cold
(from the pretrained encoder) and warm (``loop.warm_start``: the served model's weights, ``loop.warm_epochs``),
and the ``/predict`` latency that annotators see while a job trains, against idle, in the same run.

    .venv/bin/python benchmarks/loop_timeline.py          # after `make repro` (uses its DVC cache); ~15 min on 2 cores

A workspace is cloned from this repository's HEAD into a temp folder (DVC cache shared, outputs checked out),
so the committed models/onnx (trained on every annotation) is served at the start: a cold candidate on the same
data ties it and the gate keeps it; ``--served-fraction 0.5`` serves a model trained there on half the
annotations first, as if annotators had labelled the rest since. Writes benchmarks/results/loop_timeline.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.atomic import write_json  # noqa: E402
from pipeline.core.cpu import cpu_info  # noqa: E402
from tests.labelstudio_server import LabelStudioServer, ensure_label_studio_venv  # noqa: E402
from tests.service_process import ServiceProcess  # noqa: E402

log = logging.getLogger("benchmarks.loop_timeline")
API_KEY = "loop-timeline-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return proc.stdout


def workspace(tmp: Path, env: dict[str, str]) -> Path:
    """A clone of HEAD sharing this repository's DVC cache, its outputs checked out, the encoder linked."""
    ws = tmp / "workspace"
    sh(["git", "clone", "--quiet", str(ROOT), str(ws)], tmp, env)
    dvc = [sys.executable, "-m", "dvc"]
    sh([*dvc, "cache", "dir", "--local", str(ROOT / ".dvc" / "cache")], ws, env)
    # outputs whose lock entry is missing (a stage changed since the last dvc.lock) are skipped, not fatal
    subprocess.run([*dvc, "checkout", "--quiet"], cwd=ws, env=env, capture_output=True)
    if not (ws / "models" / "onnx" / "model_info.json").is_file():
        raise SystemExit("models/onnx is not in the DVC cache of this repository: run `make repro` first")
    (ws / "pretrained").symlink_to(ROOT / "pretrained", target_is_directory=True)
    return ws


def train_served_model_on_a_part(ws: Path, env: dict[str, str], fraction: float) -> None:
    """The model served at the start: trained by `dvc repro` on the first ``fraction`` of the annotated tasks
    (the others' annotations left out), as if annotators had labelled more since; the project gets them all."""
    export = ws / "data" / "labelstudio" / "export.json"
    tasks = json.loads(export.read_text(encoding="utf-8"))
    keep = int(len(tasks) * fraction)
    export.write_text(json.dumps(tasks[:keep] + [{**t, "annotations": []} for t in tasks[keep:]],
                                 ensure_ascii=False), encoding="utf-8")
    log.info("training the served model on %d of %d tasks' annotations (dvc repro)", keep, len(tasks))
    sh([sys.executable, "-m", "dvc", "repro", "--quiet"], ws, env)
    sh(["git", "checkout", "--", "data/labelstudio/export.json"], ws, env)


def import_format(task: dict) -> dict:
    """An export task as Label Studio imports it: data plus its annotations' results and flags."""
    keep = ("result", "was_cancelled", "ground_truth")
    return {"data": task["data"], "annotations": [{k: a[k] for k in keep if k in a} for a in task["annotations"]]}


class PredictLatency:
    """One-task ``/predict`` calls in a loop (what Label Studio sends when an annotator opens a task)."""

    def __init__(self, url: str, config: str) -> None:
        self.url, self.config, self.seconds, self.errors = url, config, [], 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_for(self, seconds: float) -> list[float]:
        self.start()
        time.sleep(seconds)
        return self.stop()

    def start(self) -> None:
        self.seconds, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> list[float]:
        self._stop.set()
        if self._thread:
            self._thread.join()
        return self.seconds

    def _loop(self) -> None:
        body = {"tasks": [{"id": 1, "data": {"text": "Barack Obama visited Paris with Angela Merkel today"}}],
                "label_config": self.config}
        with httpx.Client(base_url=self.url, headers=AUTH, timeout=60) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                ok = client.post("/predict", json=body).status_code == 200
                self.seconds.append(time.perf_counter() - start)
                self.errors += not ok
                time.sleep(0.05)


def percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {"requests": len(ordered), "p50_ms": round(1000 * statistics.median(ordered), 1),
            "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1)}


def train_once(ls, ml_id: int, client: httpx.Client, latency: PredictLatency, n_done: int) -> dict:
    """Press Start Training, wait for the job, return its record and the latency during it."""
    pressed = time.time()
    latency.start()
    ls.ml.train(id=ml_id)
    while True:
        report = client.get("/v1/training").json()
        if len(report["history"]) > n_done and report["current"] is None:
            break
        time.sleep(2)
    during = latency.stop()
    job = report["history"][0]
    return {"event_to_end_min": round((time.time() - pressed) / 60, 2), "job": job,
            "predict_during_job": percentiles(during), "served_after": report["served_version"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/loop_timeline.json")
    parser.add_argument("--idle-seconds", type=float, default=60)
    parser.add_argument("--served-fraction", type=float, default=1.0,
                        help="share of the annotations the first served model was trained on (1: all of them, "
                             "so a cold candidate ties it and the gate keeps it)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        env = {**os.environ, "HOME": str(tmp), "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "bench",
               "GIT_AUTHOR_EMAIL": "bench@example.com", "GIT_COMMITTER_NAME": "bench",
               "GIT_COMMITTER_EMAIL": "bench@example.com", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        ws = workspace(tmp, env)
        if args.served_fraction < 1:
            train_served_model_on_a_part(ws, env, args.served_fraction)
        config = (ws / "data" / "labelstudio" / "label_config.xml").read_text(encoding="utf-8")
        tasks = [import_format(t) for t in json.loads((ws / "data" / "labelstudio" / "export.json").read_text())]
        ensure_label_studio_venv()
        from label_studio_sdk import LabelStudio

        with LabelStudioServer(tmp / "label-studio") as server:
            ls = LabelStudio(base_url=server.url, api_key=server.api_key)
            project = ls.projects.create(title="loop timeline", label_config=config)
            ls.projects.import_tasks(id=project.id, request=tasks)
            log.info("project %d: %d tasks", project.id, len(tasks))
            service_env = {k: env[k] for k in ("HOME", "DVC_NO_ANALYTICS", "PATH") if k in env} | {
                "NER_API_KEY": API_KEY, "LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": server.api_key,
                **{k: env[k] for k in env if k.startswith("GIT_")}}
            with ServiceProcess(ws / "models" / "onnx", tmp / "serve.log", env=service_env, cwd=ws) as svc, \
                    httpx.Client(base_url=svc.url, headers=AUTH, timeout=60) as client:
                ml = ls.ml.create(project=project.id, url=svc.url, title="ner", auth_method="BASIC_AUTH",
                                  basic_auth_user="label-studio", basic_auth_pass=API_KEY)
                latency = PredictLatency(svc.url, config)
                idle = percentiles(latency.run_for(args.idle_seconds))
                log.info("idle /predict: %s", idle)
                cold = train_once(ls, ml.id, client, latency, 0)
                log.info("cold: %s", json.dumps(cold)[:600])
                params = yaml.safe_load((ws / "params.yaml").read_text())
                params["loop"]["warm_start"] = True
                (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
                warm = train_once(ls, ml.id, client, latency, 1)
                log.info("warm: %s", json.dumps(warm)[:600])
                errors = latency.errors
        report = {"cpu": cpu_info(), "tasks": len(tasks), "predict_idle": idle, "cold": cold, "warm": warm,
                  "predict_errors": errors,
                  "p99_during_job_vs_idle": round(cold["predict_during_job"]["p99_ms"] / idle["p99_ms"], 2),
                  "served_fraction": args.served_fraction, "loop": params["loop"],
                  "train_epochs": params["train"]["epochs"]}
    write_json(args.out, report)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
