"""Our Label Studio ML backend against Label Studio's own ``huggingface_ner`` example backend, same run.

Label Studio calls an ML backend with ``POST /predict`` carrying tasks and the project's label config. This
drives three servers with the same one-task ``/predict`` bodies (tweets of the sample export) from 32
keep-alive clients: ``python -m serve`` with the fp32 graph and with the int8 graph this CPU gets, and
``label_studio_ml/examples/huggingface_ner`` run the way its docker-compose runs it (gunicorn, 1 worker,
8 threads). The servers are up together and the rounds alternate between them, so a noisy hour hits all
three alike; each ratio is the median of the rounds' ratios. Also reports p50/p99 latency and each server's
memory after the rounds (PSS summed over its process tree, so shared pages count once).

The peer runs the same encoder (``paths.encoder``) as a ``BertForTokenClassification`` whose head predicts
"O" for every token: its cheapest case (no entity post-processing, an empty answer), so the ratio is a lower
bound (``--peer-encoder`` gives it another BERT folder, e.g. the example's default ``dslim/bert-base-NER``
saved to disk). Nothing loads from a model hub (``HF_HUB_OFFLINE=1``). The peer answers HTTP 500 to a tweet
that looks like a URL (it tries to download it): such requests count as its errors, not as answers.

The backend is not on PyPI (``label-studio-ml`` there is 1.0.9, from 2023): give a checkout of
https://github.com/HumanSignal/label-studio-ml-backend with ``--backend-dir``. Its Flask/gunicorn/datasets
stack goes into a virtualenv of its own (``--peer-venv``, made on first use; it sees this project's packages,
at the versions of constraints.txt, through a ``.pth`` file), so this project's environment stays as locked.
Writes benchmarks/results/serve-vs-ls-backend.json.

    git clone --depth 1 https://github.com/HumanSignal/label-studio-ml-backend ../label-studio-ml-backend
    .venv/bin/python benchmarks/serve_vs_ls_backend.py --backend-dir ../label-studio-ml-backend   # after make repro
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.atomic import write_json  # noqa: E402
from pipeline.core.cpu import cpu_info  # noqa: E402
from pipeline.core.params import load_params  # noqa: E402
from pipeline.labelstudio.tasks import iter_export, task_text  # noqa: E402
from tests.load_client import load, one_result  # noqa: E402
from tests.service_process import ROOT, ServiceProcess, free_port  # noqa: E402

log = logging.getLogger("benchmarks.serve_vs_ls_backend")
TARGET = 7.0
EXAMPLE = Path("label_studio_ml/examples/huggingface_ner")
PEER_PACKAGES = ["flask", "gunicorn", "datasets", "colorama"]  # what the example needs beyond this project's stack
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def check_backend(backend_dir: Path) -> None:
    """A one-line error saying how to get the backend unless ``backend_dir`` holds the example."""
    if not (backend_dir / EXAMPLE / "_wsgi.py").is_file() or not (backend_dir / "label_studio_ml/api.py").is_file():
        raise SystemExit(f"--backend-dir {backend_dir}: no {EXAMPLE}/_wsgi.py or label_studio_ml/api.py there; "
                         f"get it with: git clone --depth 1 https://github.com/HumanSignal/label-studio-ml-backend "
                         f"{backend_dir}")


def peer_venv(folder: Path) -> Path:
    """The peer's virtualenv (made once): this project's site-packages through a .pth, plus PEER_PACKAGES."""
    gunicorn = folder / "bin" / "gunicorn"
    if gunicorn.exists():
        return gunicorn
    log.info("making the peer's virtualenv in %s (%s)", folder, ", ".join(PEER_PACKAGES))
    try:
        subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(folder)], check=True)
        site = subprocess.run([str(folder / "bin" / "python"), "-c",
                               "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              check=True, capture_output=True, text=True).stdout.strip()
        Path(site, "ner_pipeline_env.pth").write_text(sysconfig.get_path("purelib") + "\n", encoding="utf-8")
        subprocess.run([str(folder / "bin" / "pip"), "install", "--quiet", "-c", str(ROOT / "constraints.txt"),
                        *PEER_PACKAGES], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"--peer-venv {folder}: could not make it ({exc}); fix the cause above and run again "
                         "(it is made anew until gunicorn is there)") from None
    return gunicorn


def peer_model(encoder: str, tags: list[str], folder: Path) -> Path:
    """``folder/finetuned_model``: the encoder as a token classifier whose head says "O" everywhere."""
    import torch
    from transformers import AutoTokenizer, BertForTokenClassification

    model = BertForTokenClassification.from_pretrained(
        encoder, num_labels=len(tags), id2label=dict(enumerate(tags)), label2id={t: i for i, t in enumerate(tags)})
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(-1.0)
        model.classifier.bias[tags.index("O")] = 1.0
    out = folder / "finetuned_model"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(encoder).save_pretrained(out)
    return out


class PeerProcess:
    """The example under gunicorn as its docker-compose runs it; ready (``GET /health``) on entry."""

    def __init__(self, gunicorn: Path, backend_dir: Path, model_folder: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [str(gunicorn), "--preload", "--bind", f"127.0.0.1:{self.port}", "--workers", "1",
                    "--threads", "8", "--timeout", "0", "_wsgi:app"]
        self.cwd = backend_dir / EXAMPLE
        self.env = dict(os.environ, PYTHONPATH=str(backend_dir), MODEL_DIR=str(model_folder.parent),
                        FINETUNED_MODEL_NAME=model_folder.name, BASELINE_MODEL_NAME=str(model_folder),
                        HF_HUB_OFFLINE="1", LOG_LEVEL="WARNING")
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> PeerProcess:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise SystemExit(f"the peer exited with {self.proc.returncode}:\n{tail}")
            try:
                with _NO_PROXY.open(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.__exit__()
        raise SystemExit(f"the peer not ready after 300 s; see {self.log_path}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def tree_memory_mb(pid: int) -> dict[str, float | int]:
    """Proportional set size (PSS: shared pages split among their sharers, so gunicorn's preloaded master and its
    forked worker are not counted twice) summed over ``pid`` and its descendants, in MB (Linux; else 0)."""
    pids, pss, count = [pid], 0, 0
    while pids:
        p = pids.pop()
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
            for task in os.listdir(f"/proc/{p}/task"):
                pids += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            continue
        pss += sum(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
        count += 1
    return {"pss_mb": round(pss / 1024, 1), "processes": count}


def any_results(payload: bytes) -> bool:
    """The peer leaves a task without entities out of ``results``: a list is an answer."""
    return isinstance(json.loads(payload)["results"], list)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend-dir", type=Path, required=True,
                        help="a checkout of github.com/HumanSignal/label-studio-ml-backend")
    parser.add_argument("--peer-venv", type=Path, default=ROOT / ".peer-venv",
                        help="the peer's virtualenv, made on first use")
    parser.add_argument("--peer-encoder", help="the peer's BERT folder; default: paths.encoder (ours)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model-dir", help="default: paths.onnx_dir of params.yaml")
    parser.add_argument("--texts", type=int, default=1000, help="distinct tweets, sent round-robin")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=1200, help="requests per round")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="time cap per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds over the three servers")
    parser.add_argument("--out", default="benchmarks/results/serve-vs-ls-backend.json")
    args = parser.parse_args()
    check_backend(args.backend_dir.resolve())
    paths = load_params(args.params)["paths"]
    model_dir = Path(args.model_dir or paths["onnx_dir"])
    tags = json.loads((model_dir / "labels.json").read_text())["tags"]
    label_config = Path(paths["label_config"]).read_text(encoding="utf-8")
    texts = [t for t in (task_text(task, "text") for task in iter_export(paths["export"])) if t.strip()][:args.texts]
    bodies = [json.dumps({"tasks": [{"id": i + 1, "data": {"text": t}}], "project": "1.1700000000",
                          "label_config": label_config, "params": {"login": None, "password": None, "context": None}}
                         ).encode() for i, t in enumerate(texts)]
    gunicorn = peer_venv(args.peer_venv.resolve())

    with tempfile.TemporaryDirectory(prefix="ls-backend-peer-") as tmp:
        peer_encoder = args.peer_encoder or paths["encoder"]
        folder = peer_model(peer_encoder, tags, Path(tmp) / "models")
        servers = {
            f"ours_{kind}": ServiceProcess(model_dir, Path(tmp, f"ours_{kind}.log"),
                                           env={"NER_API_KEY": "", "NER_QUANTIZED": quantized})
            for kind, quantized in (("fp32", "0"), ("int8", "1"))} | {
            "ls_huggingface_ner": PeerProcess(gunicorn, args.backend_dir.resolve(), folder, Path(tmp, "peer.log"))}
        answered = {"ours_fp32": one_result, "ours_int8": one_result, "ls_huggingface_ner": any_results}
        rounds: dict[str, list[dict]] = {name: [] for name in servers}
        memory = {}
        for server in servers.values():
            server.__enter__()
        try:
            for name, server in servers.items():  # warm-up: kernels, connections, code paths
                asyncio.run(load(server.port, bodies, 8, 64, 120, "/predict", answered[name]))
            for r in range(args.rounds):
                for name, server in servers.items():
                    res = asyncio.run(load(server.port, bodies, args.clients, args.requests, args.max_seconds,
                                           "/predict", answered[name]))
                    rounds[name].append(res)
                    log.info("round %d %-20s %7.1f req/s  p50 %7.1f ms  p99 %7.1f ms  errors %d", r + 1, name,
                             res["requests_per_s"], res["p50_ms"] or -1, res["p99_ms"] or -1, res["errors"])
            memory = {name: tree_memory_mb(server.proc.pid) for name, server in servers.items()}
        finally:
            for server in servers.values():
                server.__exit__()

    peer = "ls_huggingface_ner"
    ratios = {}
    for name in ("ours_fp32", "ours_int8"):
        each = [round(o["requests_per_s"] / p["requests_per_s"], 2) if p["requests_per_s"] else None
                for o, p in zip(rounds[name], rounds[peer])]
        ratios[f"{name}_vs_{peer}"] = {"median": statistics.median(x for x in each if x is not None)
                                       if any(x is not None for x in each) else None, "rounds": each}
    backend_commit = subprocess.run(["git", "-C", str(args.backend_dir), "rev-parse", "HEAD"], capture_output=True,
                                    text=True).stdout.strip() or None
    report = {
        "cpu": cpu_info(),
        "cpu_count": os.cpu_count(),
        "texts": len(texts),
        "clients": args.clients,
        "requests_per_round": args.requests,
        "max_seconds_per_round": args.max_seconds,
        "peer": {"example": str(EXAMPLE), "backend_commit": backend_commit, "gunicorn": "1 worker, 8 threads",
                 "model": f"{peer_encoder} as BertForTokenClassification, head 'O' everywhere (its cheapest case)"},
        "rounds": rounds,
        "median": {name: {k: statistics.median(r[k] or 0 for r in res) for k in ("requests_per_s", "p50_ms", "p99_ms")}
                   for name, res in rounds.items()},
        "memory": memory,
        "ratios": ratios,
        "target": TARGET,
        "met": {k: (v["median"] or 0) >= TARGET for k, v in ratios.items()}
               | {"errors": all(r["errors"] == 0 for name in ("ours_fp32", "ours_int8") for r in rounds[name])},
    }
    for key, value in ratios.items():
        log.info("%-40s median %.2f  rounds %s", key, value["median"] or 0, value["rounds"])
    log.info("memory %s", memory)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
