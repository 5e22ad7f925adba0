"""Tuned against default train params on the sample's test set, over several seeds, in one run.

The study (``python -m pipeline tune``) picks params by dev F1 of one seed; whether they are better is a test
F1 question across seeds. Each seed trains the default params (``params.yaml``) and the study's best params
(``reports/tune.json``) from scratch, one after the other, with the train stage's own code, and scores the best
epoch (by dev F1) on the test split with the pipeline's scoring. Writes
benchmarks/results/tune_compare.json after every run (a run cut short keeps what it measured): test F1 per
seed, mean and standard deviation of both, the difference of the means and whether it clears the seeds'
spread (the sum of the two standard deviations).

    .venv/bin/python benchmarks/tune_compare.py                 # after `make repro` and a study
    .venv/bin/python benchmarks/tune_compare.py --seeds 0 1 2 --tune reports/tune.json
    .venv/bin/python benchmarks/tune_compare.py --seeds 0 1 2 --reuse benchmarks/results/tune_compare-seed0.json

``--reuse`` takes the runs (setting and seed) that an earlier report of the same best trial (same params) holds
instead of training them again; the report says which came from which file.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from accuracy import run_crf  # benchmarks/, this script's folder: the train stage's code, scored on test

from pipeline.core.atomic import write_json
from pipeline.core.conll import read_conll
from pipeline.core.cpu import cpu_info
from pipeline.core.params import load_params
from pipeline.modeling.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.tune_compare")


def spread(f1: list[float]) -> dict[str, Any]:
    return {"f1": f1, "mean": statistics.mean(f1), "std": statistics.stdev(f1) if len(f1) > 1 else 0.0,
            "min": min(f1), "max": max(f1)}


def verdict(default: list[float], tuned: list[float]) -> dict[str, Any]:
    """Difference of the mean test F1s (points) against the seeds' spread (the two standard deviations)."""
    d, t = spread(default), spread(tuned)
    margin, noise = 100 * (t["mean"] - d["mean"]), 100 * (d["std"] + t["std"])
    return {"tuned_minus_default_points": margin, "spread_points": noise,
            "tuned_better_beyond_spread": bool(margin > noise and len(default) > 1)}


def reused_runs(paths: list[Path], best: dict[str, Any]) -> dict[tuple[int, str], tuple[float, Path]]:
    """(seed, "default" | "tuned") -> (test F1, file) from earlier reports of the same trial with the same params."""
    out: dict[tuple[int, str], tuple[float, Path]] = {}
    for path in paths:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        if earlier["study"]["trial"] != best["number"] or earlier["params"]["tuned"] != best["params"]:
            raise SystemExit(f"{path}: compares trial {earlier['study']['trial']}, not the study's best "
                             f"(trial {best['number']}): train its seeds again")
        for name, result in earlier["test_f1"].items():
            for seed, f1 in zip(earlier["seeds"], result["f1"]):  # a run cut short has fewer values than seeds
                out[(seed, name)] = (f1, path)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tune", type=Path, default=ROOT / "reports" / "tune.json",
                        help="the study's report: its best trial's params are the tuned ones")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tune_compare.json")
    parser.add_argument("--reuse", type=Path, nargs="*", default=[],
                        help="earlier reports of this script for the same trial: their seeds are not trained again")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    params = load_params(ROOT / "params.yaml")
    if not args.tune.is_file():
        raise SystemExit(f"{args.tune} not found: run `.venv/bin/python -m pipeline tune` first")
    study = json.loads(args.tune.read_text(encoding="utf-8"))
    if not study.get("best"):
        raise SystemExit(f"{args.tune}: the study has no finished trial yet")
    conll, encoder = ROOT / params["paths"]["conll_dir"], ROOT / params["paths"]["encoder"]
    if not (conll / "test.conll").is_file():
        raise SystemExit(f"{conll}/test.conll not found: run `make repro` first")
    default = TrainConfig.from_params(params["train"])
    tuned = replace(default, **study["best"]["params"])
    test = list(read_conll(conll / "test.conll"))
    runs: dict[str, list[float]] = {"default": [], "tuned": []}
    reused = reused_runs(args.reuse, study["best"])

    def report() -> dict[str, Any]:
        out: dict[str, Any] = {
            "corpus": "sample tweets (data/conll, fixed split)", "test_sentences": len(test), "seeds": args.seeds,
            "cpu": cpu_info(), "study": {"trial": study["best"]["number"], "dev_f1": study["best"]["dev_f1"],
                                         "experiment": study["best"].get("experiment")},
            "params": {"default": {k: getattr(default, k) for k in study["best"]["params"]},
                       "tuned": study["best"]["params"]},
            "test_f1": {name: spread(f1) for name, f1 in runs.items() if f1},
            "complete": all(len(f1) == len(args.seeds) for f1 in runs.values()),
            "reused": {f"{name} seed {seed}": str(source) for (seed, name), (_, source) in reused.items()
                       if seed in args.seeds},
        }
        if runs["default"] and runs["tuned"]:
            out.update(verdict(runs["default"], runs["tuned"]))
        return out

    for seed in args.seeds:  # both settings per seed, so a run cut short still compares like with like
        for name, config in (("default", default), ("tuned", tuned)):
            if (seed, name) in reused:
                runs[name].append(reused[seed, name][0])
                log.info("%s seed %d: test F1 %.4f, from %s", name, seed, *reused[seed, name])
                continue
            with tempfile.TemporaryDirectory() as tmp:
                metrics = run_crf(conll, encoder, config, seed, test, Path(tmp))
            runs[name].append(float(metrics["f1"]))  # a numpy float would make the comparisons numpy bools
            log.info("%s seed %d: test F1 %.4f", name, seed, metrics["f1"])
            write_json(args.out, report())
    result = report()
    write_json(args.out, result)  # also when every run was reused
    log.info("test F1 default %.4f ± %.4f, tuned %.4f ± %.4f: %+.2f points against a spread of %.2f",
             result["test_f1"]["default"]["mean"], result["test_f1"]["default"]["std"],
             result["test_f1"]["tuned"]["mean"], result["test_f1"]["tuned"]["std"],
             result["tuned_minus_default_points"], result["spread_points"])


if __name__ == "__main__":
    main()
