"""Packed encoder rows against padded runs, in one run: the emission graph with several texts per row.

The served graph takes one text (window) per row, so a run pads every row to its longest one, and each ONNX
run pays a fixed cost (kernel launches, the LSTM's steps). The service forms calls of ~24 one-tweet requests
and runs them in length-sorted runs of 8 (``--onnx-batch-size``): on a Zen 4, int8 costs 5.1 ms for one row
of 32 tokens and 16.2 ms for eight, so ~3.5 ms of each run is fixed. Packing puts several texts in one row:
position ids restart at each text, attention stays inside each text (a (rows, tokens, tokens) mask, which ONNX
Runtime's fused ``Attention`` and ``QAttention`` take as ``mask_index``), and each text's words are gathered
from the flattened rows, so the BiLSTM and the CRF still see one text per sequence. The maths is the same;
only the layout changes.

This builds that graph from ``paths.model_dir`` the way export builds the served ones (traced, fused, the
mask input moved to a ``segment_mask`` graph input, optimized, LayerNorms split; int8 with export's scheme for
this CPU, SmoothQuant calibrated on the same training sentences) and measures, against the served graphs of
``paths.onnx_dir``:

  parity   the packed fp32 emissions against the served fp32 ones (max abs difference), and each int8 graph's
           relative emission error against served fp32
  server   calls of ``--call-size`` tweets in arrival order: the served graph in length-sorted runs of
           ``--run-size`` (what the service does) against one packed run per call (rows of ``--cap`` tokens)
  predict  all texts length-sorted, runs of 32 (what ``predict`` does) against the same runs packed

Only the ONNX runs are timed (tokenizing and decoding are the same either way), in alternating rounds; ratios
are packed / padded throughput, best rounds and the median of per-round pairs. The JSON records the CPU.

    .venv/bin/python benchmarks/packing.py                   # after `make repro`
    .venv/bin/python benchmarks/packing.py --rounds 3 --texts 480
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from pipeline.core.atomic import write_json
from pipeline.core.config import ExportConfig
from pipeline.core.conll import read_conll
from pipeline.core.cpu import cpu_info
from pipeline.core.params import load_params
from pipeline.core.words import split_words
from pipeline.labelstudio.tasks import iter_export, task_text
from pipeline.modeling.export import (calibration_feeds, fuse_transformer, int8_graphs, optimize_for_serving,
                                      prepare_int8, quantize_int8)
from pipeline.modeling.model import load_model
from pipeline.runtime.inference import QUANTIZED_AVX2_FILE, QUANTIZED_FILE, EncodedWindow, NerRuntime, session_options

log = logging.getLogger("benchmarks.packing")
INPUTS = ["input_ids", "attention_mask", "position_ids", "word_flat", "word_mask"]


class PackedEmissions(torch.nn.Module):
    """The model's emissions with texts packed in rows: ``word_flat`` indexes the flattened (rows x tokens)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, word_flat, word_mask):  # noqa: ANN001, ANN201
        hidden = self.model.bert(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        words = hidden.reshape(-1, hidden.shape[-1])[word_flat]
        return self.model.classifier(self.model.lstm(words, word_mask.sum(dim=1)))


def export_packed(model: torch.nn.Module, path: Path, work: Path) -> Path:
    """Trace, fuse, and give every fused ``Attention`` the ``segment_mask`` input as its mask."""
    model.eval()
    model.bert.set_attn_implementation("eager")  # the pattern ORT fuses, as export does
    ids = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 0], [1, 2, 3, 4, 5, 0, 0, 0]]) % model.bert.config.vocab_size
    dummy = (ids, (ids > 0).long(), torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 3, 4, 0, 0, 0]]),
             torch.tensor([[1, 2, 0], [5, 0, 0], [9, 10, 11]]), torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]]))
    axes = {name: {0: "rows", 1: "tokens"} for name in INPUTS[:3]}
    axes |= {"word_flat": {0: "texts", 1: "words"}, "word_mask": {0: "texts", 1: "words"},
             "emissions": {0: "texts", 1: "words"}}
    with torch.inference_mode():
        torch.onnx.export(PackedEmissions(model), dummy, str(work / "packed_raw.onnx"), input_names=INPUTS,
                          output_names=["emissions"], dynamic_axes=axes, opset_version=17, dynamo=False)
    config = model.bert.config
    fuse_transformer(work / "packed_raw.onnx", work / "packed_fused.onnx", config.num_attention_heads,
                     config.hidden_size)
    fused = onnx.load(str(work / "packed_fused.onnx"))
    fused.graph.input.append(helper.make_tensor_value_info("segment_mask", TensorProto.INT32,
                                                           ["rows", "tokens", "tokens"]))
    attention = [n for n in fused.graph.node if n.op_type == "Attention"]
    if not attention:
        raise SystemExit("attention did not fuse; nothing to give the segment mask to")
    for node in attention:
        node.input[3] = "segment_mask"
    onnx.save(fused, str(path))
    return path


def pack(windows: list[EncodedWindow], cap: int) -> dict[str, np.ndarray]:
    """The packed graph's inputs: windows first-fit into rows of at most ``cap`` tokens (a longer window gets a
    row of its own), longest first; one text per row when ``cap`` is 1."""
    rows: list[list[int]] = []
    used: list[int] = []
    for j in sorted(range(len(windows)), key=lambda j: -len(windows[j].input_ids)):
        n = len(windows[j].input_ids)
        for r in range(len(rows)):
            if used[r] + n <= cap:
                rows[r].append(j)
                used[r] += n
                break
        else:
            rows.append([j])
            used.append(n)
    width, n_words = max(used), max(len(w.word_index) for w in windows)
    feed = {name: np.zeros((len(rows), width), dtype=np.int64) for name in INPUTS[:3]}
    feed["segment_mask"] = np.zeros((len(rows), width, width), dtype=np.int32)
    feed["word_flat"] = np.zeros((len(windows), n_words), dtype=np.int64)
    feed["word_mask"] = np.zeros((len(windows), n_words), dtype=np.int64)
    for r, members in enumerate(rows):
        at = 0
        for j in members:
            w, n = windows[j], len(windows[j].input_ids)
            feed["input_ids"][r, at:at + n] = w.input_ids
            feed["attention_mask"][r, at:at + n] = 1
            feed["position_ids"][r, at:at + n] = np.arange(n)
            feed["segment_mask"][r, at:at + n, at:at + n] = 1
            feed["word_flat"][j, :len(w.word_index)] = r * width + at + np.asarray(w.word_index)
            feed["word_mask"][j, :len(w.word_index)] = 1
            at += n
    return feed


def packed_calibration(feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Export's calibration batches (one sentence per row) as the packed graph's inputs."""
    out = []
    for f in feeds:
        mask = f["attention_mask"]
        rows, width = mask.shape
        out.append({"input_ids": f["input_ids"], "attention_mask": mask,
                    "position_ids": np.where(mask > 0, np.arange(width)[None, :], 0).astype(np.int64),
                    "segment_mask": (mask[:, :, None] * mask[:, None, :]).astype(np.int32),
                    "word_flat": (f["word_index"] + width * np.arange(rows)[:, None]).astype(np.int64),
                    "word_mask": f["word_mask"]})
    return out


def build(model_dir: Path, conll_dir: Path, config: ExportConfig, work: Path, vnni: bool) -> dict[str, Path]:
    """Packed fp32 and int8 graphs, served as export serves its own (optimized, LayerNorms split)."""
    model, _ = load_model(model_dir)
    masked = export_packed(model, work / "packed_masked.onnx", work)
    graphs = {"fp32": work / "packed_fp32.onnx"}
    optimize_for_serving(masked, graphs["fp32"], config.split_layer_norms)
    feeds = None
    if config.int8_smooth > 0:
        sentences = list(read_conll(conll_dir / "train.conll"))[:config.int8_calibration]
        feeds = packed_calibration(calibration_feeds(model, sentences, model_dir))
    typed, _ = prepare_int8(masked, work, config.int8_smooth, feeds)
    wanted = QUANTIZED_AVX2_FILE if not vnni and config.int8_avx2 else QUANTIZED_FILE
    [scheme] = [s for name, _, s in int8_graphs(config) if name == wanted]
    quantize_int8(typed, work / "packed_q.onnx", work, **scheme)
    graphs["int8"] = work / "packed_int8.onnx"
    optimize_for_serving(work / "packed_q.onnx", graphs["int8"], config.split_layer_norms)
    return graphs


def padded_runs(runtime: NerRuntime, windows: list[EncodedWindow], size: int) -> list[np.ndarray]:
    """The served graph's way: length-sorted runs of ``size`` windows, each padded to its longest."""
    order = sorted(range(len(windows)), key=lambda j: len(windows[j].input_ids))
    out: list[Any] = [None] * len(windows)
    for lo in range(0, len(order), size):
        idx = order[lo:lo + size]
        for j, em in zip(idx, runtime._run([windows[j] for j in idx])):
            out[j] = em
    return out


def packed_runs(session: ort.InferenceSession, windows: list[EncodedWindow], size: int,
                cap: int) -> list[np.ndarray]:
    """The same runs (sorted, ``size`` windows each), each packed into rows of ``cap`` tokens."""
    order = sorted(range(len(windows)), key=lambda j: len(windows[j].input_ids))
    out: list[Any] = [None] * len(windows)
    for lo in range(0, len(order), size):
        idx = order[lo:lo + size]
        ems = session.run(None, pack([windows[j] for j in idx], cap))[0]
        for row, j in enumerate(idx):
            out[j] = ems[row, :len(windows[j].word_index)]
    return out


def alternate(ways: dict[str, Callable[[], Any]], rounds: int, items: int) -> dict[str, Any]:
    """Items/s of each way, in turn, the order rotated every round."""
    for fn in ways.values():
        fn()  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in ways}
    names = list(ways)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            ways[name]()
            rates[name].append(items / (time.perf_counter() - start))
    return {name: {"best": round(max(v), 1), "median": round(statistics.median(v), 1),
                   "rounds": [round(x, 1) for x in v]} for name, v in rates.items()}


def relative_error(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    x, y = np.concatenate([e.ravel() for e in a]), np.concatenate([e.ravel() for e in b])
    return round(float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12)), 4)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("root").setLevel(logging.WARNING)  # the quantizer's per-tensor chatter
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--texts", type=int, default=960, help="tweets of the sample export, in its order")
    parser.add_argument("--call-size", type=int, default=24, help="the service's mean call at 32 clients")
    parser.add_argument("--run-size", type=int, default=8, help="the service's ONNX run (--onnx-batch-size)")
    parser.add_argument("--caps", type=int, nargs="+", default=[64, 128], help="row lengths to pack into")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: one per core)")
    parser.add_argument("--out", default="benchmarks/results/packing.json")
    args = parser.parse_args()
    params = load_params(args.params)
    paths, config = params["paths"], ExportConfig.from_params(params)
    vnni = bool(cpu_info()["vnni"])
    texts = [t for t in (task_text(task, "text") for task in iter_export(paths["export"])) if t.strip()][:args.texts]
    report: dict[str, Any] = {"cpu": cpu_info(), "texts": len(texts), "call_size": args.call_size,
                              "run_size": args.run_size, "caps": args.caps, "rounds": args.rounds}
    with tempfile.TemporaryDirectory(prefix="packing-") as tmp:
        graphs = build(Path(paths["model_dir"]), Path(paths["conll_dir"]), config, Path(tmp), vnni)
        served = {kind: NerRuntime(paths["onnx_dir"], quantized=kind == "int8", threads=args.threads)
                  for kind in ("fp32", "int8")}
        packed = {kind: ort.InferenceSession(str(path), session_options(args.threads, optimized=True),
                                             providers=["CPUExecutionProvider"]) for kind, path in graphs.items()}
        windows = served["fp32"].encode([[t[s:e] for s, e in split_words(t)] for t in texts])
        calls = [windows[i:i + args.call_size] for i in range(0, len(windows), args.call_size)]
        reference = padded_runs(served["fp32"], windows, 32)
        report["parity"] = {
            "packed_fp32_max_abs_diff": round(max(float(np.abs(a - b).max()) for a, b in zip(
                packed_runs(packed["fp32"], windows, 32, max(args.caps)), reference)), 7),
            "served_int8_relative_emission_error": relative_error(padded_runs(served["int8"], windows, 32), reference),
            "packed_int8_relative_emission_error": relative_error(
                packed_runs(packed["int8"], windows, 32, max(args.caps)), reference),
        }
        log.info("parity %s", report["parity"])
        for kind in ("fp32", "int8"):
            rt, session = served[kind], packed[kind]
            server = {f"padded_runs_of_{args.run_size}": lambda: [padded_runs(rt, c, args.run_size) for c in calls]}
            server |= {f"packed_{cap}": (lambda cap=cap: [packed_runs(session, c, len(c), cap) for c in calls])
                       for cap in args.caps}
            predict = {"padded_runs_of_32": lambda: padded_runs(rt, windows, 32)}
            predict |= {f"packed_{cap}": (lambda cap=cap: packed_runs(session, windows, 32, cap)) for cap in args.caps}
            report[kind] = {"server": alternate(server, args.rounds, len(texts)),
                            "predict": alternate(predict, args.rounds, len(texts))}
            for part, base in (("server", f"padded_runs_of_{args.run_size}"), ("predict", "padded_runs_of_32")):
                res = report[kind][part]
                res["ratios_vs_padded"] = {
                    name: {"best": round(r["best"] / res[base]["best"], 2),
                           "median_of_pairs": round(statistics.median(
                               a / b for a, b in zip(r["rounds"], res[base]["rounds"])), 2)}
                    for name, r in list(res.items()) if name != base}
                log.info("%s %s: %s", kind, part, json.dumps({k: v["best"] for k, v in res.items() if "best" in v})
                         + " ratios " + json.dumps(res["ratios_vs_padded"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
