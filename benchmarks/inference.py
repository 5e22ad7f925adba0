"""Inference speed of the exported model vs PyTorch eager, in one run, as ratios.

Same weights, same test sentences, same length-sorted batches for every
contender; only the engine differs. Writes benchmarks/results/inference.json.

    .venv/bin/python benchmarks/inference.py                 # after `make repro`
    .venv/bin/python benchmarks/inference.py --sentences 500 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from pipeline.atomic import write_json
from pipeline.convert import iter_export, task_text
from pipeline.data import collate, make_examples
from pipeline.encoding import load_tokenizer
from pipeline.inference import NerRuntime
from pipeline.model import load_model
from pipeline.params import load_params
from pipeline.words import split_words

log = logging.getLogger("benchmarks.inference")


def timed(fn, repeats: int) -> float:
    """Best-of-N wall time: the least disturbed run on a shared machine."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/inference.json")
    args = parser.parse_args()
    paths = load_params(args.params)["paths"]

    texts = [task_text(t, "text") for t in iter_export(paths["export"])]
    texts = [t for t in texts if t.strip()][:args.sentences]
    words = [[t[s:e] for s, e in split_words(t)] for t in texts]

    model, labels = load_model(paths["model_dir"])
    tokenizer, specials = load_tokenizer(paths["model_dir"])
    from pipeline.conll import Sentence

    sentences = [Sentence(str(i), t, split_words(t), ["O"] * len(w)) for i, (t, w) in enumerate(zip(texts, words))]
    examples = make_examples(sentences, tokenizer, specials, {"O": 0}, model.head_config.max_length)
    examples.sort(key=lambda e: len(e.input_ids))
    batches = [collate(examples[i:i + args.batch_size], specials.pad)
               for i in range(0, len(examples), args.batch_size)]

    @torch.inference_mode()
    def torch_eager() -> None:
        for b in batches:
            em = model(b["input_ids"], b["attention_mask"], b["word_index"], b["word_mask"])
            model.decode(em, b["word_mask"])

    fp32 = NerRuntime(paths["onnx_dir"], batch_size=args.batch_size)
    int8 = NerRuntime(paths["onnx_dir"], quantized=True, batch_size=args.batch_size)
    contenders = {
        "torch_eager": torch_eager,
        "onnx_fp32": lambda: fp32.predict(texts),
        "onnx_int8": lambda: int8.predict(texts),
    }
    results = {}
    for name, fn in contenders.items():
        fn() if name != "torch_eager" else None  # warm-up (ORT builds kernels on first run)
        seconds = timed(fn, args.repeats)
        results[name] = {"seconds": round(seconds, 3), "sentences_per_s": round(len(texts) / seconds, 1)}
        log.info("%-12s %8.1f sentences/s", name, results[name]["sentences_per_s"])
    base = results["torch_eager"]["sentences_per_s"]
    for name in results:
        results[name]["ratio_vs_torch_eager"] = round(results[name]["sentences_per_s"] / base, 2)
    report = {
        "sentences": len(texts),
        "mean_words": round(statistics.mean(len(w) for w in words), 1),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
