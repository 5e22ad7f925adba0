"""Load test of the NER service over loopback, against the in-process runtime and a server without batching.

In one run: the in-process batched runtime's sentences/s on the same texts;
then ``python -m serve`` with micro-batching (the defaults) and the same server
with ``--max-batch-size 1`` (one request per ONNX run), each driven by 1, 8 and
32 concurrent keep-alive clients that send one text per ``POST /v1/ner``
request. Every level sends a fixed number of requests and stops early at a
time cap. Reports requests/s, p50/p99 latency, errors, the server's mean batch
size, the CPU each request cost in the server's event loop, in its batcher and
ONNX Runtime threads and in the load generator (Linux), and the ratios the
issue sets as targets. The in-process runtime is measured again on calls the
size the batched server formed (its mean batch at the top level): the server
against that says what HTTP and hand-offs cost, that against the best
in-process way says what the calls' make-up costs. The batched server runs as
``python -m serve`` does by default (uvloop + httptools, which the ``serve``
extra installs); the same server on asyncio + h11 (``--event-loop asyncio
--http h11``, what runs without the extra) is driven at the top concurrency
level too, so the ratio says whether the default pays on the machine at
hand; and so is the batched server with ONNX Runtime's threads spinning after each call
(``NER_ORT_SPIN_AFTER_CALL=1``; by default they stop when a call returns). Writes
benchmarks/results/serve.json.

    .venv/bin/python benchmarks/serve.py                      # after `make repro`
    .venv/bin/python benchmarks/serve.py --requests 500 --clients 1 32
    .venv/bin/python benchmarks/serve.py --quantized --out benchmarks/results/serve-int8.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# This script is named serve.py: keep its own folder off the import path, so `serve` is the service package.
# The project root goes first instead: the load generator's ServiceProcess lives in tests/.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from pipeline.core.atomic import write_json  # noqa: E402
from pipeline.core.cpu import cpu_info  # noqa: E402
from pipeline.core.params import load_params  # noqa: E402
from pipeline.core.words import split_words  # noqa: E402
from pipeline.labelstudio.tasks import iter_export, task_text  # noqa: E402
from pipeline.runtime.inference import NerRuntime  # noqa: E402
from serve.settings import Settings  # noqa: E402
from tests.load_client import load  # noqa: E402
from tests.service_process import ServiceProcess  # noqa: E402

log = logging.getLogger("benchmarks.serve")
TARGET_VS_IN_PROCESS = 0.85
TARGET_VS_NO_BATCHING = 5.0
TARGET_P99_MS_INT8 = 150.0


def scrape(url: str) -> dict[str, float]:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{url}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name in ("ner_batch_size_texts_sum", "ner_batch_size_texts_count")}


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of process ``pid``, by thread id (Linux /proc; else empty)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_ms_per_request(pid: int, before: dict[int, float], after: dict[int, float], client_s: float,
                       requests: int) -> dict[str, float] | None:
    """Where the CPU goes, per answered request: the server's main thread (the event loop: HTTP, JSON,
    pydantic, routing), its other threads (the batcher and ONNX Runtime's pool: tokenizing, the graph,
    Viterbi), and this load generator."""
    if not requests or not after:
        return None
    loop = after.get(pid, 0.0) - before.get(pid, 0.0)
    rest = sum(v - before.get(tid, 0.0) for tid, v in after.items() if tid != pid)
    return {"event_loop": round(1000 * loop / requests, 2),
            "batcher_and_onnx_runtime": round(1000 * rest / requests, 2),
            "load_generator": round(1000 * client_s / requests, 2)}


def run_server(name: str, model_dir: str, env: dict[str, str], bodies: list[bytes], levels: list[int],
               requests: int, max_seconds: float, log_dir: Path, args: list[str] | None = None) -> dict:
    results = {}
    with ServiceProcess(model_dir, log_dir / f"{name}.log", env={"NER_API_KEY": "", **env}, args=args) as svc:
        asyncio.run(load(svc.port, bodies, 8, 64, 60))  # warm-up: ORT kernels, connections, code paths
        for clients in levels:
            before = scrape(svc.url)
            cpu_before, client_before = thread_cpu_seconds(svc.proc.pid), sum(os.times()[:2])
            res = asyncio.run(load(svc.port, bodies, clients, requests, max_seconds))
            cpu_after, client_after = thread_cpu_seconds(svc.proc.pid), sum(os.times()[:2])
            after = scrape(svc.url)
            res["cpu_ms_per_request"] = cpu_ms_per_request(svc.proc.pid, cpu_before, cpu_after,
                                                           client_after - client_before, res["ok"])
            batches = after["ner_batch_size_texts_count"] - before["ner_batch_size_texts_count"]
            texts = after["ner_batch_size_texts_sum"] - before["ner_batch_size_texts_sum"]
            res["mean_batch_texts"] = round(texts / batches, 2) if batches else None
            results[str(clients)] = res
            log.info("%-12s %2d clients: %7.1f req/s  p50 %6.1f ms  p99 %6.1f ms  errors %d  mean batch %s  "
                     "CPU ms per request %s", name, clients, res["requests_per_s"], res["p50_ms"] or -1,
                     res["p99_ms"] or -1, res["errors"], res["mean_batch_texts"], res["cpu_ms_per_request"])
    return results


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model-dir", help="default: paths.onnx_dir of params.yaml")
    parser.add_argument("--texts", type=int, default=1000, help="distinct texts, sent round-robin")
    parser.add_argument("--requests", type=int, default=600, help="requests per concurrency level")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time cap per level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-batch-size", type=int, default=Settings.max_batch_size)
    parser.add_argument("--max-wait-ms", type=float, default=Settings.max_wait_ms)
    parser.add_argument("--onnx-batch-size", type=int, default=Settings.onnx_batch_size)
    parser.add_argument("--quantized", action="store_true", help="the int8 graph for this CPU everywhere")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/serve.json")
    args = parser.parse_args()
    paths = load_params(args.params)["paths"]
    model_dir = args.model_dir or paths["onnx_dir"]

    texts = [task_text(t, "text") for t in iter_export(paths["export"])]
    texts = [t for t in texts if t.strip()][:args.texts]
    bodies = [json.dumps({"texts": [t]}).encode() for t in texts]

    # In-process: the runtime the server uses, no HTTP, best of N, measured before and after the servers. The
    # reference is the fastest of: the predict stage's way (defaults: all texts in one call, length-sorted ONNX
    # runs of 32, one thread per core), the same with the server's ONNX run size and threads, and the server's
    # micro-batches back to back.
    threads = Settings().ort_threads()
    contenders = {
        "one_call_onnx_batch_32_all_cores": (32, 0, len(texts)),
        f"one_call_onnx_batch_{args.onnx_batch_size}_threads_{threads}": (args.onnx_batch_size, threads, len(texts)),
        f"chunks_of_{args.max_batch_size}_onnx_batch_{args.onnx_batch_size}_threads_{threads}": (
            args.onnx_batch_size, threads, args.max_batch_size),
    }

    def measure_in_process(when: str, ways: dict[str, tuple[int, int, int]]) -> dict:
        out = {}
        for name, (onnx_batch, n_threads, chunk) in ways.items():
            runtime = NerRuntime(model_dir, batch_size=onnx_batch, threads=n_threads, quantized=args.quantized)
            runtime.predict(texts[:64])
            best = min(_timed(lambda: [runtime.predict(texts[i:i + chunk]) for i in range(0, len(texts), chunk)])
                       for _ in range(args.repeats))
            out[name] = {"seconds": round(best, 3), "sentences_per_s": round(len(texts) / best, 1)}
            log.info("in-process (%s) %-40s %7.1f sentences/s", when, name, out[name]["sentences_per_s"])
        return out

    before = measure_in_process("before", contenders)
    common = {"NER_QUANTIZED": "1" if args.quantized else "0"}
    top = str(max(args.clients))
    batching = {**common, "NER_MAX_BATCH_SIZE": str(args.max_batch_size), "NER_MAX_WAIT_MS": str(args.max_wait_ms),
                "NER_ONNX_BATCH_SIZE": str(args.onnx_batch_size)}
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        batched = run_server("batched", model_dir, batching, bodies, args.clients, args.requests, args.max_seconds,
                             Path(tmp))
        plain_io = run_server("batched_asyncio_h11", model_dir, batching, bodies, [int(top)], args.requests,
                              args.max_seconds, Path(tmp), ["--event-loop", "asyncio", "--http", "h11"])
        spinning = run_server("batched_spin_after_call", model_dir, {**batching, "NER_ORT_SPIN_AFTER_CALL": "1"},
                              bodies, [int(top)], args.requests, args.max_seconds, Path(tmp))
        unbatched = run_server("no_batching", model_dir, {**common, "NER_MAX_BATCH_SIZE": "1", "NER_MAX_WAIT_MS": "0",
                                                          "NER_ONNX_BATCH_SIZE": "1"},
                               bodies, args.clients, args.requests, args.max_seconds, Path(tmp))

    # ... and again after the servers: other tenants of a shared machine come and go; the best figure counts
    after = measure_in_process("after", contenders)
    in_process = {name: max(before[name], after[name], key=lambda r: r["sentences_per_s"]) for name in contenders}
    reference = max(in_process, key=lambda k: in_process[k]["sentences_per_s"])
    # The runtime on calls the size the batched server formed at the top level (its mean batch): a few random
    # texts sorted by length only among themselves pad more than the reference's one sorted call. Server vs
    # this one is what HTTP and hand-offs cost; this one vs the reference is what the calls' make-up costs.
    call = max(1, round(batched[top]["mean_batch_texts"] or 1))
    same_calls = f"chunks_of_{call}_onnx_batch_{args.onnx_batch_size}_threads_{threads}"
    at_call_size = measure_in_process("at the server's call size", {
        same_calls: (args.onnx_batch_size, threads, call)})[same_calls]
    ratios = {
        f"{top}_clients_vs_in_process": round(
            batched[top]["requests_per_s"] / in_process[reference]["sentences_per_s"], 2),
        f"{top}_clients_vs_in_process_at_the_server_call_size": round(
            batched[top]["requests_per_s"] / at_call_size["sentences_per_s"], 2),
        "in_process_at_the_server_call_size_vs_reference": round(
            at_call_size["sentences_per_s"] / in_process[reference]["sentences_per_s"], 2),
        f"{top}_clients_vs_no_batching": round(batched[top]["requests_per_s"] / unbatched[top]["requests_per_s"], 2),
        "in_process_vs_one_text_per_call_server": round(
            in_process[reference]["sentences_per_s"] / unbatched[top]["requests_per_s"], 2),
        f"{top}_clients_default_io_vs_asyncio_h11": round(
            batched[top]["requests_per_s"] / plain_io[top]["requests_per_s"], 2),
        f"{top}_clients_default_vs_spin_after_call": round(
            batched[top]["requests_per_s"] / spinning[top]["requests_per_s"], 2),
    }
    errors = sum(r["errors"] for r in (*batched.values(), *unbatched.values(), *plain_io.values(),
                                       *spinning.values()))
    report = {
        "model_dir": str(model_dir),
        "quantized": args.quantized,
        "texts": len(texts),
        "mean_words": round(statistics.mean(len(split_words(t)) for t in texts), 1),
        "requests_per_level": args.requests,
        "max_seconds_per_level": args.max_seconds,
        "server": {"max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
                   "onnx_batch_size": args.onnx_batch_size, "ort_threads": threads, "workers": 1},
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "cpu": cpu_info(),
        "in_process": in_process,
        "in_process_before_and_after": {"before": before, "after": after},
        "in_process_reference": reference,
        "in_process_at_the_server_call_size": {same_calls: at_call_size},
        "batched": batched,
        "batched_asyncio_h11": plain_io,
        "batched_spin_after_call": spinning,
        "no_batching": unbatched,
        "ratios": ratios,
        "targets": {"errors": 0, "vs_in_process": TARGET_VS_IN_PROCESS, "vs_no_batching": TARGET_VS_NO_BATCHING,
                    **({"p99_ms": TARGET_P99_MS_INT8} if args.quantized else {})},
        "met": {"errors": errors == 0,
                **({"p99_ms": (batched[top]["p99_ms"] or 1e9) <= TARGET_P99_MS_INT8} if args.quantized else {}),
                "vs_in_process": ratios[f"{top}_clients_vs_in_process"] >= TARGET_VS_IN_PROCESS,
                "vs_no_batching": ratios[f"{top}_clients_vs_no_batching"] >= TARGET_VS_NO_BATCHING},
    }
    for key, value in ratios.items():
        log.info("%-40s %.2f", key, value)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    log.info("wrote %s", args.out)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
