"""Uncertainty study: which of the three confidences finds the sentences the model gets wrong first.

Active learning shows annotators the least confident tasks first (Label Studio sorts by the prediction's
``score``, which ``predict.uncertainty`` picks from ``pipeline/runtime/uncertainty.py``: ``sequence``,
``min_entity`` or ``entropy``). This script measures, on a labelled CoNLL split, how well each one puts the
wrongly predicted sentences at the front:

- every sentence is predicted by the exported model (``NerRuntime.predict_words`` on the split's own words);
- a sentence is **wrong** when its predicted entity spans differ from the gold ones at all: an entity missed,
  an extra one, or one with another type or other boundaries (span sets of ``pipeline.core.tags``, predicted
  tags written in the scheme of the split's ``labels.json``);
- for each score, sentences are ranked by ascending confidence (most doubtful first) and, for the first
  10% and 25% of them: the share that is wrong (``precision``), that share over the base rate (``lift``; the
  base rate is the share of wrong sentences overall, what a random order gives in expectation) and the part
  of all wrong sentences found there (``recall``). Ties in a confidence are broken in expectation (a tie
  group straddling the cut counts with its wrong share), never by file order;
- ``random`` is the mean over ``--shuffles`` seeded random orders, with its 5th-95th percentile range: a
  score whose figure lies inside that range is not distinguishable from random order on this split;
  ``perfect`` is the best any score could do (every wrong sentence first). ``longest_first`` ranks by
  length alone (most words first), no model: long sentences hold more entities to get wrong, and
  ``sequence`` falls with length, so a score should beat this to show it reads the model's doubt.

Speed plays no part, so it runs on one thread by default. Writes benchmarks/results/uncertainty.json.

    .venv/bin/python benchmarks/uncertainty.py                  # the test split
    .venv/bin/python benchmarks/uncertainty.py --data test dev  # both, one table each
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.atomic import write_json
from pipeline.core.conll import Sentence, read_conll
from pipeline.core.cpu import cpu_info
from pipeline.core.metrics import score
from pipeline.core.params import load_params
from pipeline.core.tags import first_violation, spans_to_tags, tags_to_spans
from pipeline.runtime.inference import NerRuntime, TextPrediction
from pipeline.runtime.uncertainty import UNCERTAINTIES

log = logging.getLogger("benchmarks.uncertainty")

FRACTIONS = (0.10, 0.25)


# --- the ranking and its figures: pure functions -------------------------------------------------------------

def is_wrong(gold: list[str], pred: list[str]) -> bool:
    """True when the two tag sequences do not describe the same set of entities (span, type)."""
    return set(tags_to_spans(gold)) != set(tags_to_spans(pred))


def rank_ascending(confidence: Sequence[float]) -> list[int]:
    """Indices from the least to the most confident (ties in input order)."""
    return sorted(range(len(confidence)), key=lambda i: confidence[i])


def cutoff(n: int, fraction: float) -> int:
    """How many items the first ``fraction`` of ``n`` holds (rounded half up, at least one of a non-empty list)."""
    return min(n, max(1 if n else 0, math.floor(n * fraction + 0.5)))


def wrong_in_first(confidence: Sequence[float], wrong: Sequence[bool], k: int) -> float:
    """Expected number of wrong items among the ``k`` least confident, ties broken at random.

    Items below the confidence at the cut all count; the tie group that straddles the cut counts with the
    share of its slots inside the cut times its number of wrong items (the mean over every tie order).
    """
    if k <= 0 or not confidence:
        return 0.0
    order = rank_ascending(confidence)
    threshold = confidence[order[k - 1]]
    below = [i for i in order if confidence[i] < threshold]
    tied = [i for i in order if confidence[i] == threshold]
    found = float(sum(bool(wrong[i]) for i in below))
    slots = k - len(below)
    return found + slots * sum(bool(wrong[i]) for i in tied) / len(tied)


def random_wrong_in_first(wrong: Sequence[bool], k: int, shuffles: int, seed: int) -> np.ndarray:
    """Wrong items among the first ``k`` of each of ``shuffles`` seeded random orders."""
    rng = np.random.default_rng(seed)
    flags = np.asarray(wrong, dtype=np.int64)
    if k <= 0 or not len(flags):
        return np.zeros(shuffles)
    return rng.permuted(np.tile(flags, (shuffles, 1)), axis=1)[:, :k].sum(axis=1).astype(float)


def figures(found: float, k: int, n_wrong: int, base_rate: float) -> dict[str, float]:
    """Precision (wrong share in the first ``k``), lift over the base rate, recall (share of all wrong found)."""
    precision = found / k if k else 0.0
    return {"precision": round(precision, 4),
            "lift": round(precision / base_rate, 2) if base_rate else 0.0,
            "recall": round(found / n_wrong, 4) if n_wrong else 0.0}


def study(confidence: dict[str, Sequence[float]], wrong: Sequence[bool], *, fractions: Sequence[float] = FRACTIONS,
          shuffles: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The table: for each score (and ``random``, ``perfect``), the figures of the first ``fraction`` of items."""
    n, n_wrong = len(wrong), int(sum(bool(w) for w in wrong))
    base_rate = n_wrong / n if n else 0.0
    table: dict[str, dict[str, dict[str, float]]] = {}
    cuts = {f"{round(100 * f)}%": cutoff(n, f) for f in fractions}
    for name, values in confidence.items():
        table[name] = {cut: figures(wrong_in_first(values, wrong, k), k, n_wrong, base_rate) for cut, k in cuts.items()}
    table["random"], table["perfect"] = {}, {}
    for cut, k in cuts.items():
        draws = random_wrong_in_first(wrong, k, shuffles, seed)
        row = figures(float(draws.mean()), k, n_wrong, base_rate)
        row["precision_p05"] = round(float(np.percentile(draws, 5)) / k, 4) if k else 0.0
        row["precision_p95"] = round(float(np.percentile(draws, 95)) / k, 4) if k else 0.0
        table["random"][cut] = row
        table["perfect"][cut] = figures(float(min(k, n_wrong)), k, n_wrong, base_rate)
    return {"sentences": n, "wrong": n_wrong, "base_rate": round(base_rate, 4), "cut_sizes": cuts,
            "shuffles": shuffles, "table": table}


def format_table(result: dict[str, Any]) -> list[str]:
    """The table as aligned text lines, one row per score."""
    cuts = list(result["cut_sizes"])
    head = f"{'score':<13}" + "".join(f" | {'wrong in first ' + c:>18} {'lift':>5} {'found':>6}" for c in cuts)
    lines = [head, "-" * len(head)]
    for name, row in result["table"].items():
        lines.append(f"{name:<13}" + "".join(
            f" | {100 * row[c]['precision']:>17.1f}% {row[c]['lift']:>4.2f}x {100 * row[c]['recall']:>5.1f}%"
            for c in cuts))
    return lines


# --- the model on a split ------------------------------------------------------------------------------------

def predicted_tags(sentence: Sentence, prediction: TextPrediction, scheme: str) -> list[str]:
    """The prediction's entities as per-word tags in ``scheme`` (entities start and end on word offsets)."""
    first = {s: i for i, (s, _) in enumerate(sentence.words)}
    last = {e: i + 1 for i, (_, e) in enumerate(sentence.words)}
    spans = [(first[e.start], last[e.end], e.label) for e in prediction.entities]
    return spans_to_tags(len(sentence.words), spans, scheme)


def conll_path(value: str, conll_dir: str) -> Path:
    """``test``/``dev``/``train`` name the split in ``conll_dir``; anything else is a path."""
    return Path(conll_dir) / f"{value}.conll" if value in ("train", "dev", "test") else Path(value)


def run_split(runtime: NerRuntime, path: Path, shuffles: int, seed: int) -> dict[str, Any]:
    labels = json.loads((path.parent / "labels.json").read_text(encoding="utf-8"))
    scheme = labels["scheme"]
    unknown = sorted(set(runtime.tags) - set(labels["tags"]))
    if unknown:
        raise SystemExit(f"{path.parent / 'labels.json'} has no tags {unknown} that the model predicts: "
                         "the model was not trained on this label set")
    sentences = [s for s in read_conll(path) if s.words]
    predictions = runtime.predict_words([s.text for s in sentences], [s.words for s in sentences])
    gold = [s.tags for s in sentences]
    pred = [predicted_tags(s, p, scheme) for s, p in zip(sentences, predictions)]
    wrong = [is_wrong(g, p) for g, p in zip(gold, pred)]
    confidence = {name: [p.confidence[name] for p in predictions] for name in UNCERTAINTIES}
    length = [-float(len(s.words)) for s in sentences]  # reference: no model, the longest sentences first
    result = study({**confidence, "longest_first": length}, wrong, shuffles=shuffles, seed=seed)
    result = {"data": str(path), "scheme": scheme,
              "f1": round(float(score(gold, pred, scheme)["f1"]), 4),
              "ill_formed_gold": sum(first_violation(g, scheme) is not None for g in gold),
              "sentences_with_gold_entities": sum(bool(tags_to_spans(g)) for g in gold),
              "mean_confidence": {name: {"wrong": _mean(v, wrong, True), "right": _mean(v, wrong, False)}
                                  for name, v in confidence.items()},
              **result}
    return result


def _mean(values: Sequence[float], wrong: Sequence[bool], which: bool) -> float | None:
    picked = [v for v, w in zip(values, wrong) if w == which]
    return round(float(np.mean(picked)), 4) if picked else None


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default=None, help="exported model folder (default: paths.onnx_dir)")
    parser.add_argument("--data", nargs="+", default=["test"],
                        help="CoNLL files, or test/dev/train for the split in paths.conll_dir (default: test)")
    parser.add_argument("--int8", action="store_true", help="score with model.int8.onnx")
    parser.add_argument("--shuffles", type=int, default=1000, help="random orders averaged for the baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--out", default="benchmarks/results/uncertainty.json")
    args = parser.parse_args()
    paths = load_params(args.params)["paths"]
    model_dir = args.model or paths["onnx_dir"]
    runtime = NerRuntime(model_dir, quantized=args.int8, threads=args.threads)

    splits: dict[str, Any] = {}
    for value in args.data:
        path = conll_path(value, paths["conll_dir"])
        name = path.stem if path.stem not in splits else str(path)
        result = run_split(runtime, path, args.shuffles, args.seed)
        splits[name] = result
        log.info("%s: %d sentences, %d wrong (base rate %.1f%%), F1 %.4f; first 10%% = %d, 25%% = %d sentences",
                 path, result["sentences"], result["wrong"], 100 * result["base_rate"], result["f1"],
                 *result["cut_sizes"].values())
        for line in format_table(result):
            log.info("%s", line)
        rnd = result["table"]["random"]
        log.info("random order, 5th-95th percentile of 'wrong in first': %s", ", ".join(
            f"{cut} {100 * r['precision_p05']:.1f}-{100 * r['precision_p95']:.1f}%" for cut, r in rnd.items()))

    report = {
        "model_version": runtime.model_version,
        "model_dir": str(model_dir),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "cpu": cpu_info(),
        "units": {
            "precision": "share of wrong sentences among the first k% (least confident first)",
            "lift": "precision / base_rate (base_rate: share of wrong sentences in the split)",
            "recall": "wrong sentences in the first k% / all wrong sentences",
            "wrong": "predicted entity spans differ from gold (missed, extra, other type or boundaries)",
        },
        "splits": splits,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
