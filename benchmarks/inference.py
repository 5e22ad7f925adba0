"""Inference speed on CPU, four engines in one run: Hugging Face pipeline, our PyTorch model, ONNX fp32, ONNX int8.

Every contender gets the same texts: the sample's test sentences (``test.conll``),
cycled up to ``--sentences`` when the file holds fewer. Each one goes from raw text
to entities with character offsets:

  (a) hf_pipeline   ``pipeline("token-classification", aggregation_strategy="simple")`` on a
                    ``BertForTokenClassification`` built from the same MiniLM encoder (``paths.encoder``,
                    from disk; its head is random: only speed is measured), called with
                    ``batch_size=--batch-size`` like ours (the tuned baseline)
  (a') hf_pipeline_as_written  the same pipeline called as the issue writes it, ``ner(texts)``: its
                    default batch size, 1 (throughput only; its latency is (a)'s)
  (b) torch_eager   our BERT-BiLSTM-CRF in PyTorch eager mode (``paths.model_dir``)
  (c) onnx_fp32     our ONNX runtime (``pipeline.runtime.inference.NerRuntime``), ``model.onnx``
  (d) onnx_int8     the same runtime on its int8 graph for this CPU (``model.int8.onnx`` with VNNI,
                    ``model.int8-avx2.onnx`` without: ``int8_graph`` in the JSON)
  (e) plain_ort_fp32 / plain_ort_int8  the peer a user who skips our product would build:
                    ``BertForTokenClassification`` of the same encoder in plain ONNX Runtime (exported the
                    usual way, ``quantize_dynamic`` for int8), sorted batches, argmax only
                    (``benchmarks/plain_ort_tagger.py``); ours must match it although it runs a BiLSTM and a CRF

(b), (c) and (d) share everything but the engine that computes emissions: word
splitting, sub-tokens, length-sorted dynamic batches, numpy Viterbi and marginals.

Two figures per contender:

  * throughput: sentences/s over all texts in one call, batches of ``--batch-size``
    (``pipeline(texts, batch_size=...)`` for HF); best of ``--repeats`` runs, run in turn with
    the others so that a busy neighbour slows all of them alike. Ratios are given from the best
    runs and as the median of per-repeat pairs (the two runs of one repeat share the machine's
    load of the moment; on this shared host the same int8 graph moved 370-425 sentences/s
    between minutes).
  * latency: one sentence per call (batch of 1), p50 and p99 over every text; the contenders
    take turns in blocks of ``--latency-block`` sentences. Not sentence by sentence: each
    engine's thread pool spins for a while after a call, and on 2 cores that spin stole half
    the next engine's time (HF one-per-call 62/s alone, 27/s interleaved; ORT 132/s vs 78/s).

A third part bounds what any fp32 engine can do here: the encoder's FLOPs per sentence
(counted from its config and the real sub-token counts) against this machine's fp32 GEMM
rate (one ONNX Runtime MatMul of the model's feed-forward shape, best of many runs). Target
ratios that need more than that rate are out of reach of any fp32 graph on this CPU. The plain
tagger is held against its own ceiling too (the same sub-tokens, no BiLSTM): how near ONNX
Runtime's kernels bring a bare encoder, beside how near our graph comes.

Ratios are taken inside this run only (the machine is shared; absolute figures move). The int8
F1 drop is measured here on the test set, as ``pipeline/modeling/export.py`` measures it.

    .venv/bin/python benchmarks/inference.py                       # after `make repro`
    .venv/bin/python benchmarks/inference.py --sentences 500 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from scipy.stats import bootstrap
from seqeval.metrics.sequence_labeling import get_entities
from transformers import BertConfig

from pipeline.core.atomic import write_json
from pipeline.core.conll import read_conll
from pipeline.core.cpu import cpu_info
from pipeline.core.metrics import score
from pipeline.core.params import load_params
from pipeline.core.words import split_words
from pipeline.modeling.model import ENCODER_CONFIG, HEAD_CONFIG, load_model
from pipeline.runtime.inference import NerRuntime
from plain_ort_tagger import PlainTagger, export_plain  # benchmarks/, this script's folder

log = logging.getLogger("benchmarks.inference")

TARGETS = {"onnx_fp32_vs_hf_pipeline": 5.0, "onnx_int8_vs_onnx_fp32": 1.8, "int8_abs_f1_change_points": 0.5,
           "onnx_fp32_vs_plain_ort_tagger": 1.0, "onnx_int8_vs_plain_ort_tagger_int8": 1.0}
#: ONNX Runtime's u8s8 int8 kernels saturate without VNNI (its quantization docs): the int8 target is per ISA.
INT8_TARGET_WITHOUT_VNNI = 1.5


def int8_target() -> float:
    return TARGETS["onnx_int8_vs_onnx_fp32"] if cpu_info()["vnni"] else INT8_TARGET_WITHOUT_VNNI


def torch_runtime(onnx_dir: str, model_dir: str, batch_size: int) -> NerRuntime:
    """The ONNX runtime with its emission engine swapped for the PyTorch model; all else is shared."""
    runtime = NerRuntime(onnx_dir, batch_size=batch_size)
    model, _ = load_model(model_dir)
    model.eval()

    @torch.inference_mode()
    def emissions(input_ids, attention_mask, word_index, word_mask) -> np.ndarray:
        return model(*(torch.from_numpy(a) for a in (input_ids, attention_mask, word_index, word_mask))).numpy()

    runtime.emissions = emissions  # type: ignore[method-assign]
    return runtime


def hf_pipeline(encoder: str, tags: list[str]):
    from transformers import AutoTokenizer, BertForTokenClassification, pipeline

    model = BertForTokenClassification.from_pretrained(
        encoder, num_labels=len(tags), id2label=dict(enumerate(tags)), label2id={t: i for i, t in enumerate(tags)})
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    return pipeline("token-classification", model=model, tokenizer=tokenizer, aggregation_strategy="simple",
                    device=-1)


def gemm_gflops(rows: int, inner: int, cols: int, threads: int, runs: int = 40) -> float:
    """Best fp32 MatMul rate of ONNX Runtime here, for an ``(rows, inner) @ (inner, cols)`` product."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((inner, cols), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, inner])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, cols])], [weight])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                   .SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((rows, inner), dtype=np.float32)
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"x": x})
        best = min(best, time.perf_counter() - start)
    return 2 * rows * inner * cols / best / 1e9


def forward_gflop(config: Any, lstm_hidden: int, windows: list[Any]) -> float:
    """Multiply-adds x 2 of one pass over ``windows`` (encoder GEMMs, attention, the first BiLSTM layer): work
    that no engine can skip, so a lower bound and the ceiling computed from it an upper one."""
    h, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    flop = 0.0
    for w in windows:
        tokens, words = len(w.input_ids), len(w.word_index)
        flop += layers * (2 * tokens * (4 * h * h + 2 * h * inner) + 4 * tokens * tokens * h)
        flop += 2 * 2 * words * 4 * (h + lstm_hidden) * lstm_hidden  # both directions, 4 gates, first layer
    return flop / 1e9


def f1_change_interval(gold: list[list[str]], base: list[list[str]], other: list[list[str]],
                       level: float = 0.95) -> list[float]:
    """Paired bootstrap interval of ``other``'s micro F1 minus ``base``'s, in points: sentences resampled with
    their gold and both predictions. On a test set of a few hundred sentences one changed sentence moves F1 by
    about half a point; the interval says what a change of that size can tell."""
    counts = []
    for g, a, b in zip(gold, base, other):
        truth, found_a, found_b = set(get_entities(g)), set(get_entities(a)), set(get_entities(b))
        counts.append((len(truth & found_a), len(found_a), len(truth & found_b), len(found_b), len(truth)))
    columns = tuple(np.array(counts, dtype=np.float64).T)

    def change(hit_a, n_a, hit_b, n_b, n_gold, axis=-1):
        gold_n = n_gold.sum(axis)
        return 100 * (2 * hit_b.sum(axis) / np.maximum(n_b.sum(axis) + gold_n, 1)
                      - 2 * hit_a.sum(axis) / np.maximum(n_a.sum(axis) + gold_n, 1))

    ci = bootstrap(columns, change, paired=True, vectorized=True, n_resamples=5000, confidence_level=level,
                   method="percentile", rng=np.random.default_rng(0)).confidence_interval
    return [round(float(ci.low), 2), round(float(ci.high), 2)]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-block", type=int, default=100,
                        help="sentences each contender answers one per call before the next takes its turn")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch and ONNX Runtime intra-op threads (default: the cores this process may use)")
    parser.add_argument("--out", default="benchmarks/results/inference.json")
    args = parser.parse_args()
    params = load_params(args.params)
    paths = params["paths"]
    torch.set_num_threads(args.threads)

    test = list(read_conll(Path(paths["conll_dir"]) / "test.conll"))
    texts = [test[i % len(test)].text for i in range(args.sentences)]
    if len(test) < args.sentences:
        log.info("test.conll has %d sentences: cycled to %d", len(test), args.sentences)

    fp32 = NerRuntime(paths["onnx_dir"], threads=args.threads, batch_size=args.batch_size)
    int8 = NerRuntime(paths["onnx_dir"], quantized=True, threads=args.threads, batch_size=args.batch_size)
    eager = torch_runtime(paths["onnx_dir"], paths["model_dir"], args.batch_size)
    hf = hf_pipeline(paths["encoder"], fp32.tags)
    plain_dir = Path(tempfile.mkdtemp(prefix="plain-ort-"))
    plain = {name: PlainTagger(export_plain(paths["encoder"], fp32.tags, plain_dir, quantize), paths["encoder"],
                               fp32.tags, args.threads, args.batch_size)
             for name, quantize in (("plain_ort_fp32", False), ("plain_ort_int8", True))}

    batched: dict[str, Callable[[list[str]], Any]] = {
        "hf_pipeline": lambda xs: hf(xs, batch_size=args.batch_size),
        "hf_pipeline_as_written": lambda xs: hf(xs),
        "torch_eager": eager.predict,
        "onnx_fp32": fp32.predict,
        "onnx_int8": int8.predict,
        **{name: tagger.predict for name, tagger in plain.items()},
    }
    single: dict[str, Callable[[list[str]], Any]] = {
        "hf_pipeline": lambda xs: hf(xs[0]),
        "torch_eager": eager.predict,
        "onnx_fp32": fp32.predict,
        "onnx_int8": int8.predict,
        **{name: tagger.predict for name, tagger in plain.items()},
    }
    for name, fn in batched.items():  # warm-up: first calls build kernels and caches
        fn(texts[:args.batch_size])
    for fn in single.values():
        fn(texts[:1])

    throughput: dict[str, list[float]] = {name: [] for name in batched}
    for _ in range(args.repeats):
        for name, fn in batched.items():
            start = time.perf_counter()
            fn(texts)
            throughput[name].append(time.perf_counter() - start)
            log.info("%-12s batched %8.1f sentences/s", name, len(texts) / throughput[name][-1])

    latency: dict[str, list[float]] = {name: [] for name in single}
    for lo in range(0, len(texts), args.latency_block):
        for name, fn in single.items():
            for text in texts[lo:lo + args.latency_block]:
                start = time.perf_counter()
                fn([text])
                latency[name].append(time.perf_counter() - start)

    latency["hf_pipeline_as_written"] = latency["hf_pipeline"]  # one text per call is the same call
    results: dict[str, dict[str, float]] = {}
    for name in batched:
        best = min(throughput[name])
        results[name] = {
            "batched_sentences_per_s": round(len(texts) / best, 1),
            "batched_sentences_per_s_median": round(len(texts) / statistics.median(throughput[name]), 1),
            "single_sentences_per_s": round(len(texts) / sum(latency[name]), 1),
            "latency_p50_ms": round(1000 * percentile(latency[name], 50), 2),
            "latency_p99_ms": round(1000 * percentile(latency[name], 99), 2),
        }
        log.info("%-12s batched %7.1f/s  one-per-call %7.1f/s  p50 %6.2f ms  p99 %6.2f ms", name,
                 results[name]["batched_sentences_per_s"], results[name]["single_sentences_per_s"],
                 results[name]["latency_p50_ms"], results[name]["latency_p99_ms"])

    def ratios(fast: str, slow: str) -> dict[str, Any]:
        # paired: the two runs of one repeat, minutes apart at most, share the machine's load of the moment
        paired = [t_slow / t_fast for t_fast, t_slow in zip(throughput[fast], throughput[slow])]
        return {
            "batched_throughput": round(results[fast]["batched_sentences_per_s"]
                                        / results[slow]["batched_sentences_per_s"], 2),
            "batched_throughput_paired_median": round(statistics.median(paired), 2),
            "batched_throughput_paired": [round(r, 2) for r in paired],
            "single_throughput": round(results[fast]["single_sentences_per_s"]
                                       / results[slow]["single_sentences_per_s"], 2),
            "latency_p50": round(results[slow]["latency_p50_ms"] / results[fast]["latency_p50_ms"], 2),
        }

    # the fp32 ceiling: this machine's GEMM rate over the work one sentence needs
    config = BertConfig.from_json_file(str(Path(paths["model_dir"]) / ENCODER_CONFIG))
    head = json.loads((Path(paths["model_dir"]) / HEAD_CONFIG).read_text())
    windows = fp32.encode([[t[a:b] for a, b in split_words(t)] for t in texts])
    gflop = forward_gflop(config, head["lstm_hidden"], windows) / len(texts)
    plain_gflop = forward_gflop(config, 0, windows) / len(texts)
    rows = args.batch_size * round(statistics.mean(len(w.input_ids) for w in windows))
    peak = gemm_gflops(rows, config.hidden_size, config.intermediate_size, args.threads)
    ceiling = peak / gflop
    target = TARGETS["onnx_fp32_vs_hf_pipeline"]
    needed = {"hf_pipeline": target * results["hf_pipeline"]["batched_sentences_per_s"],
              "hf_pipeline_as_written": target * results["hf_pipeline_as_written"]["batched_sentences_per_s"],
              "hf_pipeline_one_per_call": target * results["hf_pipeline"]["single_sentences_per_s"]}
    fp32_bound = {
        "gemm_gflops": round(peak, 1),
        "gemm_shape": [rows, config.hidden_size, config.intermediate_size],
        "gflop_per_sentence": round(gflop, 4),
        "max_sentences_per_s": round(ceiling, 1),
        "onnx_fp32_share_of_max": round(results["onnx_fp32"]["batched_sentences_per_s"] / ceiling, 2),
        # the plain tagger against its own ceiling (the same sub-tokens, no BiLSTM): how close ORT's kernels get
        "plain_ort_fp32_gflop_per_sentence": round(plain_gflop, 4),
        "plain_ort_fp32_share_of_its_max": round(results["plain_ort_fp32"]["batched_sentences_per_s"] * plain_gflop
                                                 / peak, 2),
        "needed_for_target": {name: round(v, 1) for name, v in needed.items()},
        "needed_within_max": {name: bool(v <= ceiling) for name, v in needed.items()},
    }
    log.info("fp32 ceiling: %.1f GFLOP/s GEMM / %.3f GFLOP per sentence = %.0f sentences/s; onnx_fp32 at %.0f%%, "
             "the plain tagger at %.0f%% of its own", peak, gflop, ceiling, 100 * fp32_bound["onnx_fp32_share_of_max"],
             100 * fp32_bound["plain_ort_fp32_share_of_its_max"])

    scheme = json.loads((Path(paths["onnx_dir"]) / "labels.json").read_text())["scheme"]
    gold = [s.tags for s in test]
    tags_fp32, tags_int8 = fp32.tag_words([s.tokens for s in test]), int8.tag_words([s.tokens for s in test])
    f1_fp32, f1_int8 = float(score(gold, tags_fp32, scheme)["f1"]), float(score(gold, tags_int8, scheme)["f1"])
    comparison = {
        "onnx_fp32_vs_hf_pipeline": ratios("onnx_fp32", "hf_pipeline"),
        "onnx_fp32_vs_hf_pipeline_as_written": ratios("onnx_fp32", "hf_pipeline_as_written"),
        "onnx_fp32_batched_vs_hf_pipeline_one_per_call": round(results["onnx_fp32"]["batched_sentences_per_s"]
                                                               / results["hf_pipeline"]["single_sentences_per_s"], 2),
        "onnx_fp32_vs_torch_eager": ratios("onnx_fp32", "torch_eager"),
        "onnx_int8_vs_onnx_fp32": ratios("onnx_int8", "onnx_fp32"),
        "int8_f1_change_points": round(100 * (f1_int8 - f1_fp32), 2),
        "int8_f1_change_ci95": f1_change_interval(gold, tags_fp32, tags_int8),
        "int8_changed_test_sentences": sum(a != b for a, b in zip(tags_fp32, tags_int8)),
        "onnx_fp32_vs_plain_ort_tagger": ratios("onnx_fp32", "plain_ort_fp32"),
        "onnx_int8_vs_plain_ort_tagger_int8": ratios("onnx_int8", "plain_ort_int8"),
        "plain_ort_int8_vs_plain_ort_fp32": ratios("plain_ort_int8", "plain_ort_fp32"),
    }
    met = {
        "onnx_fp32_vs_hf_pipeline": comparison["onnx_fp32_vs_hf_pipeline"]["batched_throughput"]
        >= TARGETS["onnx_fp32_vs_hf_pipeline"],
        "onnx_fp32_vs_hf_pipeline_as_written": comparison["onnx_fp32_vs_hf_pipeline_as_written"]["batched_throughput"]
        >= TARGETS["onnx_fp32_vs_hf_pipeline"],
        "onnx_fp32_batched_vs_hf_pipeline_one_per_call": comparison["onnx_fp32_batched_vs_hf_pipeline_one_per_call"]
        >= TARGETS["onnx_fp32_vs_hf_pipeline"],
        "onnx_int8_vs_onnx_fp32": comparison["onnx_int8_vs_onnx_fp32"]["batched_throughput"]
        >= int8_target(),
        "int8_abs_f1_change_points": abs(comparison["int8_f1_change_points"]) < TARGETS["int8_abs_f1_change_points"],
        **{key: comparison[key]["batched_throughput"] >= TARGETS[key]
           for key in ("onnx_fp32_vs_plain_ort_tagger", "onnx_int8_vs_plain_ort_tagger_int8")},
    }
    report = {
        "model_version": fp32.model_version,
        "sentences": len(texts),
        "unique_test_sentences": len(test),
        "cycled": len(test) < len(texts),
        "mean_words": round(statistics.mean(len(test[i % len(test)].words) for i in range(len(texts))), 1),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_info(),
        "int8_graph": int8.onnx_path.name,  # the one the runtime chose for this CPU (model.int8-avx2.onnx without VNNI)
        "units": {
            "batched_sentences_per_s": f"all texts in one call, batches of {args.batch_size}; best of repeats",
            "single_sentences_per_s": "texts one per call (batch of 1), summed time",
            "latency_p50_ms / latency_p99_ms": "one call with one sentence, text in, entities out",
        },
        "test_f1": {"onnx_fp32": f1_fp32, "onnx_int8": f1_int8},
        "results": results,
        "comparison": comparison,
        "fp32_bound": fp32_bound,
        "targets": {**TARGETS, "onnx_int8_vs_onnx_fp32": int8_target()},
        "targets_met": {k: bool(v) for k, v in met.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    log.info("%s", json.dumps(comparison))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
