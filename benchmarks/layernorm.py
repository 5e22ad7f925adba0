"""LayerNorm as ONNX Runtime's fused CPU kernel vs as plain ops (what export serves), in one run.

Two parts, each timed in alternating rounds so that the host's load of the moment hits both sides alike:

  kernel   one ``SkipLayerNormalization`` node (input + bias + skip, normalized, scaled, shifted) on a
           (``--batch-size``, ``--tokens``, hidden) tensor, hidden from the model, against the same node
           after ``pipeline.modeling.layernorm.split_layer_norms``
  graphs   the served graphs built from ``paths.model_dir`` the way export builds them (traced, fused,
           optimized; the int8 graph for this CPU quantized with export's settings), once with their
           fused LayerNorm kernels and once split; each pair runs ``NerRuntime.predict`` on the same test
           sentences (cycled up to ``--sentences``), and the emissions of the two are compared

Ratios are fused time / split time (> 1: the split graph is faster): the best round of each side, and
the median of per-round pairs. The JSON records the CPU and its ISA.

    .venv/bin/python benchmarks/layernorm.py                   # after `make repro`
    .venv/bin/python benchmarks/layernorm.py --rounds 3 --sentences 500
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pipeline.core.atomic import write_json
from pipeline.core.config import ExportConfig
from pipeline.core.conll import read_conll
from pipeline.core.cpu import cpu_info
from pipeline.core.params import load_params
from pipeline.modeling.export import (calibration_feeds, export_onnx, fuse_transformer, int8_graphs, optimize_for_cpu,
                                      prepare_int8, quantize_int8)
from pipeline.modeling.layernorm import split_layer_norms
from pipeline.modeling.model import load_model
from pipeline.runtime.inference import MODEL_FILE, NerRuntime, int8_file

log = logging.getLogger("benchmarks.layernorm")


def alternate(a: Callable[[], Any], b: Callable[[], Any], rounds: int) -> dict[str, Any]:
    """Seconds of ``a`` (fused) and ``b`` (split), in turn, the order swapped every round."""
    times: dict[str, list[float]] = {"fused": [], "split": []}
    for r in range(rounds):
        for name, fn in (("fused", a), ("split", b)) if r % 2 == 0 else (("split", b), ("fused", a)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    pairs = [f / s for f, s in zip(times["fused"], times["split"])]
    return {"seconds": times, "fused_vs_split_best": min(times["fused"]) / min(times["split"]),
            "fused_vs_split_median": statistics.median(pairs)}


def kernel_graph(hidden: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(1, 0.2, hidden).astype(np.float32), n) for n in ("g", "b", "bias")]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "tokens", hidden]) for n in ("x", "skip", "y")]
    node = helper.make_node("SkipLayerNormalization", ["x", "skip", "g", "b", "bias"], ["y"], domain="com.microsoft",
                            epsilon=1e-12)
    graph = helper.make_graph([node], "skip_layer_norm", io[:2], io[2:], weights)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def kernel(work: Path, hidden: int, batch: int, tokens: int, threads: int, rounds: int, calls: int) -> dict[str, Any]:
    onnx.save(kernel_graph(hidden), str(work / "kernel.onnx"))
    split_layer_norms(work / "kernel.onnx", work / "kernel-split.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    rng = np.random.default_rng(1)
    feed = {n: rng.normal(0, 2, (batch, tokens, hidden)).astype(np.float32) for n in ("x", "skip")}
    sessions = [ort.InferenceSession(str(work / f), options, providers=["CPUExecutionProvider"])
                for f in ("kernel.onnx", "kernel-split.onnx")]
    outputs = [s.run(None, feed)[0] for s in sessions]
    for s in sessions:  # warm-up: the first calls grow each session's memory arena
        for _ in range(calls // 4):
            s.run(None, feed)
    result = alternate(*[lambda s=s: [s.run(None, feed) for _ in range(calls)] for s in sessions], rounds)
    return {"shape": [batch, tokens, hidden], "calls_per_round": calls,
            "max_abs_diff": float(np.abs(outputs[0] - outputs[1]).max()), **result}


def served_graphs(model_dir: Path, onnx_dir: Path, conll_dir: Path, config: ExportConfig,
                  work: Path) -> dict[str, Path]:
    """fp32 and this CPU's int8 graph as export builds them, before the split: {file name: path}."""
    model, _ = load_model(model_dir)
    export_onnx(model, work / "raw.onnx", config.opset)
    bert = model.bert.config
    fuse_transformer(work / "raw.onnx", work / "fused.onnx", bert.num_attention_heads, bert.hidden_size)
    graphs = {MODEL_FILE: work / "fp32.onnx"}
    optimize_for_cpu(work / "fused.onnx", graphs[MODEL_FILE])
    name = int8_file(onnx_dir, bool(cpu_info()["vnni"]))
    feeds = None
    if config.int8_smooth > 0:
        feeds = calibration_feeds(model, list(read_conll(conll_dir / "train.conll"))[:config.int8_calibration],
                                  model_dir)
    typed, _ = prepare_int8(work / "fused.onnx", work, config.int8_smooth, feeds)
    scheme = next(s for file, _, s in int8_graphs(config) if file == name)
    quantize_int8(typed, work / "int8.onnx", work, **scheme)
    graphs[name] = work / "int8-optimized.onnx"
    optimize_for_cpu(work / "int8.onnx", graphs[name])
    return graphs


def whole_graphs(args: argparse.Namespace, paths: dict[str, str], config: ExportConfig, work: Path) -> dict[str, Any]:
    onnx_dir = Path(paths["onnx_dir"])
    graphs = served_graphs(Path(paths["model_dir"]), onnx_dir, Path(paths["conll_dir"]), config, work)
    folders = {}
    for side in ("fused", "split"):  # the served folder (tokenizer, CRF, info) with these graphs in it
        folders[side] = work / side
        shutil.copytree(onnx_dir, folders[side], ignore=shutil.ignore_patterns("*.onnx"))
        for name, path in graphs.items():
            if side == "fused":
                shutil.copy2(path, folders[side] / name)
            else:
                split_layer_norms(path, folders[side] / name)
    test = list(read_conll(Path(paths["conll_dir"]) / "test.conll"))
    texts = [test[i % len(test)].text for i in range(args.sentences)]
    out = {}
    for name in graphs:
        runtimes = {side: NerRuntime(folder, threads=args.threads, batch_size=args.batch_size, onnx_file=name)
                    for side, folder in folders.items()}
        words = [s.tokens for s in test]
        emissions = {side: rt.word_emissions(words) for side, rt in runtimes.items()}
        tags = {side: runtimes[side].decode_tags(em) for side, em in emissions.items()}
        for rt in runtimes.values():
            rt.predict(texts[:64])  # warm-up
        result = alternate(lambda: runtimes["fused"].predict(texts), lambda: runtimes["split"].predict(texts),
                           args.rounds)
        result["sentences_per_s"] = {side: args.sentences / min(t) for side, t in result["seconds"].items()}
        result["max_abs_emission_diff"] = float(np.abs(np.concatenate(emissions["fused"])
                                                       - np.concatenate(emissions["split"])).max())
        result["changed_test_sequences"] = sum(a != b for a, b in zip(tags["fused"], tags["split"]))
        out[name] = result
        log.info("%s: fused/split %.3f best, %.3f median of pairs; %.1f vs %.1f sentences/s", name,
                 result["fused_vs_split_best"], result["fused_vs_split_median"], result["sentences_per_s"]["fused"],
                 result["sentences_per_s"]["split"])
    return out


def main() -> None:
    # the quantizer and the fusion tools log every tensor at INFO on the root logger: theirs at WARNING
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=48, help="sub-tokens per row of the kernel's tensor")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="ONNX Runtime intra-op threads (default: the CPUs this process may use)")
    parser.add_argument("--out", default="benchmarks/results/layernorm.json")
    args = parser.parse_args()
    params = load_params(args.params)
    paths, config = params["paths"], ExportConfig.from_params(params)
    hidden = json.loads((Path(paths["onnx_dir"]) / "model_info.json").read_text())["hidden_size"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report = {"cpu": cpu_info(), "threads": args.threads, "onnxruntime": ort.__version__,
                  "kernel": kernel(work, hidden, args.batch_size, args.tokens, args.threads, args.rounds, calls=200)}
        log.info("kernel: fused/split %.3f best, %.3f median of pairs", report["kernel"]["fused_vs_split_best"],
                 report["kernel"]["fused_vs_split_median"])
        report["graphs"] = whole_graphs(args, paths, config, work)
    write_json(args.out, report)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
