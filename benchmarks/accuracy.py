"""Accuracy study: our BERT-BiLSTM-CRF against two baselines on the sample, and ablations of the training advice.

Models, each trained ``--seeds`` times on the same split (``data/conll``) and scored on the test set with the
pipeline's own seqeval scoring (micro F1, per type), best epoch by dev F1 for every model:

- ``crf``: the train stage as ``dvc repro`` runs it (``params.yaml``);
- ``softmax``: Hugging Face ``BertForTokenClassification`` on the same encoder, epochs, batch size, encoder
  rate and warmup, trained by ``Trainer`` (first sub-token of each word labelled, the usual recipe);
- ``softmax_our_rates``: the same, with the classifier at our head's rate (``lr_head``): the CRF vs softmax
  comparison at equal rates;
- ``bilstm``: a BiLSTM-CRF without BERT (word embeddings learned from the training words), same epochs,
  batch size and CRF rate; its own rate for embeddings and BiLSTM (``--bilstm-lr``), since nothing in it is
  pretrained.

``--ablations`` runs each ablation as a ``dvc exp run -S`` override of the default pipeline (targets up to
``evaluate``), so every figure is also an experiment in ``dvc exp show``. Writes
benchmarks/results/accuracy.json.

    .venv/bin/python benchmarks/accuracy.py                          # after `make repro`
    .venv/bin/python benchmarks/accuracy.py --ablations
    .venv/bin/python benchmarks/accuracy.py --models --ablations one_lr no_warmup   # add to an earlier study
    .venv/bin/python benchmarks/accuracy.py --seeds 0 --models crf --epochs 1   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from hf_token_classification import label_first_subtokens  # benchmarks/, this script's folder
from torchcrf import CRF

from pipeline.core.atomic import write_json
from pipeline.core.conll import Sentence, read_conll
from pipeline.core.cpu import cpu_info
from pipeline.core.metrics import score
from pipeline.core.params import load_params
from pipeline.modeling.evaluate import evaluate
from pipeline.modeling.model import LengthAwareBiLSTM
from pipeline.modeling.optim import build_optimizer
from pipeline.modeling.train import TrainConfig, seed_everything, train

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.accuracy")

MODELS = ["crf", "softmax", "softmax_our_rates", "bilstm"]
ABLATIONS: dict[str, list[str]] = {
    "default": [],
    "one_lr": ["train.lr_head=5e-5", "train.lr_crf=5e-5"],
    "no_warmup": ["train.warmup=0"],
    "layer_decay_0.8": ["train.layer_decay=0.8"],
    "lr_crf_1e-3": ["train.lr_crf=1e-3"],
    "lr_crf_1e-1": ["train.lr_crf=1e-1"],
    "unconstrained": ["train.constrain_transitions=false"],
}


def run_crf(conll: Path, encoder: Path, config: TrainConfig, seed: int, test: list[Sentence], work: Path) -> dict:
    train(conll, encoder, work / "model", work / "live", config, seed)
    return evaluate(work / "model", test)


def run_softmax(train_s: list[Sentence], dev_s: list[Sentence], test_s: list[Sentence], tags: list[str],
                scheme: str, encoder: Path, config: TrainConfig, seed: int, work: Path,
                our_rates: bool = False) -> dict:
    """``our_rates``: the classifier learns at ``lr_head`` instead of the encoder's rate, as our head does."""
    import numpy as np
    from transformers import (
        AutoTokenizer,
        BertForTokenClassification,
        DataCollatorForTokenClassification,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(str(encoder))

    def encode(sentences: list[Sentence]) -> list[dict]:
        return label_first_subtokens(tokenizer, sentences, tags, config.max_length)

    def to_tags(logits: np.ndarray, labels: np.ndarray) -> list[list[str]]:
        return [[tags[p] for p, gold in zip(row_p, row_l) if gold != -100]
                for row_p, row_l in zip(logits.argmax(-1), labels)]

    def dev_f1(prediction) -> dict[str, float]:
        gold = [[tags[g] for g in row if g != -100] for row in prediction.label_ids]
        return {"f1": score(gold, to_tags(prediction.predictions, prediction.label_ids), scheme)["f1"]}

    seed_everything(seed)
    model = BertForTokenClassification.from_pretrained(str(encoder), num_labels=len(tags))
    args = TrainingArguments(
        output_dir=str(work / "hf"), per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size, num_train_epochs=config.epochs,
        learning_rate=config.lr_encoder, warmup_steps=config.warmup, weight_decay=config.weight_decay,
        max_grad_norm=config.grad_clip, lr_scheduler_type="linear", eval_strategy="epoch", save_strategy="epoch",
        save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="f1", logging_strategy="no",
        report_to=[], disable_tqdm=True, seed=seed, use_cpu=not torch.cuda.is_available())
    # our groups (bert.* at lr_encoder, the classifier as "head" at lr_head, no decay on bias/LayerNorm)
    optimizer = build_optimizer(model, lr_encoder=config.lr_encoder, lr_head=config.lr_head, lr_crf=config.lr_crf,
                                weight_decay=config.weight_decay) if our_rates else None
    trainer = Trainer(model=model, args=args, train_dataset=encode(train_s), eval_dataset=encode(dev_s),
                      data_collator=DataCollatorForTokenClassification(tokenizer), compute_metrics=dev_f1,
                      optimizers=(optimizer, None))  # None: Trainer builds its linear warmup on our groups
    trainer.train()
    test_rows = encode(test_s)
    prediction = trainer.predict(test_rows)
    pred = to_tags(prediction.predictions, prediction.label_ids)
    # a truncated sentence keeps O for its cut-off words, as a user of this recipe would get
    pred = [p + ["O"] * (len(s.tags) - len(p)) for p, s in zip(pred, test_s)]
    return score([s.tags for s in test_s], pred, scheme)


class WordBiLstmCrf(torch.nn.Module):
    """The pre-BERT classic: learned word embeddings, a BiLSTM and a CRF."""

    def __init__(self, vocab: int, tags: int, hidden: int, dim: int = 100, dropout: float = 0.5) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim, padding_idx=0)
        self.dropout = torch.nn.Dropout(dropout)
        self.lstm = LengthAwareBiLSTM(dim, hidden, 1, 0.0)
        self.out = torch.nn.Linear(2 * hidden, tags)
        self.crf = CRF(tags, batch_first=True)

    def emissions(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(self.lstm(self.dropout(self.embed(ids)), mask.sum(1))))


def run_bilstm(train_s: list[Sentence], dev_s: list[Sentence], test_s: list[Sentence], tags: list[str],
               scheme: str, config: TrainConfig, seed: int, epochs: int, lr: float) -> dict:
    import random

    seed_everything(seed)
    counts = Counter(w.lower() for s in train_s for w in s.tokens)
    vocab = {w: i + 2 for i, w in enumerate(sorted(w for w, n in counts.items() if n > 1))}  # 0 pad, 1 unknown
    tag_id = {t: i for i, t in enumerate(tags)}

    def batch(sentences: list[Sentence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, width = len(sentences), max(len(s.tokens) for s in sentences)
        ids = torch.zeros(n, width, dtype=torch.long)
        gold = torch.zeros(n, width, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.long)
        for i, s in enumerate(sentences):
            ids[i, :len(s.tokens)] = torch.tensor([vocab.get(w.lower(), 1) for w in s.tokens])
            gold[i, :len(s.tags)] = torch.tensor([tag_id[t] for t in s.tags])
            mask[i, :len(s.tokens)] = 1
        return ids, gold, mask

    @torch.inference_mode()
    def predict(model: WordBiLstmCrf, sentences: list[Sentence]) -> list[list[str]]:
        model.eval()
        out = []
        for lo in range(0, len(sentences), 64):
            ids, _, mask = batch(sentences[lo:lo + 64])
            out.extend([tags[t] for t in path] for path in model.crf.decode(model.emissions(ids, mask), mask.bool()))
        return out

    model = WordBiLstmCrf(len(vocab) + 2, len(tags), config.lstm_hidden)
    optimizer = torch.optim.Adam([
        {"params": [p for n, p in model.named_parameters() if not n.startswith("crf.")], "lr": lr},
        {"params": model.crf.parameters(), "lr": config.lr_crf}])
    rng = random.Random(seed)
    best, best_state = -1.0, None
    for _ in range(epochs):
        model.train()
        order = list(range(len(train_s)))
        rng.shuffle(order)
        for lo in range(0, len(order), config.batch_size):
            ids, gold, mask = batch([train_s[i] for i in order[lo:lo + config.batch_size]])
            loss = -model.crf(model.emissions(ids, mask), gold, mask.bool(), reduction="mean")
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
        f1 = score([s.tags for s in dev_s], predict(model, dev_s), scheme)["f1"]
        if f1 > best:
            best, best_state = f1, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return score([s.tags for s in test_s], predict(model, test_s), scheme)


def ablation_command(name: str, overrides: list[str]) -> list[str]:
    """The DVC command of one ablation (its first word, ``dvc``, is replaced by the venv's when it runs)."""
    if not overrides:
        return ["dvc", "repro", "evaluate"]
    sets = [a for o in overrides for a in ("-S", o)]
    return ["dvc", "exp", "run", "--temp", "-C", "pretrained", "-n", f"acc-{name}", *sets, "evaluate"]


def run_ablation(name: str, overrides: list[str]) -> dict:
    """One ``dvc exp run -S`` of the default pipeline up to evaluate; its test metrics from ``dvc exp show``.

    Each runs in a temporary copy (``--temp``; ``-C pretrained`` brings the git-ignored encoder along), so
    overrides never pile up in the workspace; the experiment's recorded params are checked to be the committed
    ones plus its own overrides. The default (no override) is the workspace's own ``dvc repro``: same seed,
    and DVC restores it from its cache when ``make repro`` already ran it.
    """
    dvc = str(Path(sys.executable).with_name("dvc"))
    command = [dvc, *ablation_command(name, overrides)[1:]]
    if not overrides:
        subprocess.run(command, cwd=ROOT, check=True)
        return json.loads((ROOT / "metrics" / "eval.json").read_text())["test"]

    def shown() -> Any:
        return json.loads(subprocess.run([dvc, "exp", "show", "--json"], cwd=ROOT, check=True,
                                         capture_output=True, text=True).stdout)

    def find(node: Any) -> dict | None:
        if isinstance(node, dict):
            if node.get("name") == f"acc-{name}" and isinstance(node.get("data"), dict):
                return node["data"]
            node = list(node.values())
        if isinstance(node, list):
            for child in node:
                hit = find(child)
                if hit is not None:
                    return hit
        return None

    data = find(shown())  # an earlier study's run of this commit is reused (its params are checked below)
    if data is None:
        subprocess.run(command, cwd=ROOT, check=True)
        data = find(shown())
    if data is None:
        raise RuntimeError(f"experiment acc-{name} not found in `dvc exp show`")
    committed = yaml.safe_load(subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=ROOT, check=True,
                                              capture_output=True, text=True).stdout)["train"]
    expected = {**committed, **dict(map(train_override, overrides))}
    ran_with = data["params"]["params.yaml"]["data"]["train"]
    studied = {train_override(o)[0] for ov in ABLATIONS.values() for o in ov}
    wrong = {k: (ran_with.get(k), expected[k]) for k in studied if not same_value(ran_with.get(k), expected[k])}
    if wrong:
        raise RuntimeError(f"experiment acc-{name} ran with {wrong} (ran, expected): not a clean ablation")
    return data["metrics"]["metrics/eval.json"]["data"]["test"]


def train_override(override: str) -> tuple[str, Any]:
    """``train.lr_crf=1e-3`` -> (``lr_crf``, its YAML value), as ``-S`` writes it into params.yaml."""
    key, value = override.split("=", 1)
    return key.removeprefix("train."), yaml.safe_load(value)


def same_value(a: Any, b: Any) -> bool:
    """Params compare as numbers where both are (``5e-5`` from ``-S`` is a YAML string, 5e-05 in exp show)."""
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def summarise(runs: list[dict]) -> dict:
    f1 = [r["f1"] for r in runs]
    types = sorted({t for r in runs for t in r["per_type"]})
    return {
        "f1_mean": statistics.mean(f1), "f1_std": statistics.stdev(f1) if len(f1) > 1 else 0.0, "f1": f1,
        "per_type_f1_mean": {t: statistics.mean(r["per_type"].get(t, {}).get("f1", 0.0) for r in runs)
                             for t in types},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="*", default=MODELS, choices=MODELS,
                        help="none: keep the models already in --out")
    parser.add_argument("--epochs", type=int, help="override train.epochs for every model")
    parser.add_argument("--bilstm-epochs", type=int, help="epochs for the model without BERT (default: same)")
    parser.add_argument("--bilstm-lr", type=float, default=5e-3,
                        help="its embedding/BiLSTM rate: learned from scratch, it needs more than a BERT head")
    parser.add_argument("--ablations", nargs="*", choices=list(ABLATIONS), metavar="NAME",
                        help=f"also run these ablations through dvc exp (no name: all of {list(ABLATIONS)})")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "accuracy.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    params = load_params(ROOT / "params.yaml")
    conll = ROOT / params["paths"]["conll_dir"]
    encoder = ROOT / params["paths"]["encoder"]
    if not (conll / "train.conll").is_file():
        raise SystemExit(f"{conll}/train.conll not found: run `dvc repro convert` first")
    config = TrainConfig.from_params(params["train"])
    if args.epochs:
        config = replace(config, epochs=args.epochs)
    labels = json.loads((conll / "labels.json").read_text())
    tags, scheme = labels["tags"], labels["scheme"]
    train_s, dev_s, test_s = (list(read_conll(conll / f"{split}.conll")) for split in ("train", "dev", "test"))

    # A study is long: figures already in --out for the same seeds/epochs/batch are kept, so a run cut short
    # can be finished with e.g. `--models --ablations one_lr`.
    setup = {"seeds": args.seeds, "epochs": config.epochs, "batch_size": config.batch_size}
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if any(previous.get(k) != v for k, v in setup.items()):
        previous = {}
    kept_models = {n: m for n, m in previous.get("models", {}).items() if n not in args.models}
    ablations: dict[str, dict] = dict(previous.get("ablations", {}))
    results: dict[str, list[dict]] = {m: [] for m in args.models}
    run_ablations = [] if args.ablations is None else (args.ablations or list(ABLATIONS))

    def report() -> dict[str, Any]:
        """The figures so far: written after every run, so a study cut short still leaves what it measured."""
        models = {**kept_models, **{name: summarise(runs) for name, runs in results.items() if runs}}
        out: dict[str, Any] = {
            "corpus": "sample tweets (data/conll, fixed split)", "test_sentences": len(test_s), **setup, "cpu": cpu_info(),
            "complete": set(models) == set(MODELS) and set(ablations) == set(ABLATIONS), "models": models,
        }
        if "crf" in models and "softmax" in models:
            out["crf_minus_softmax_f1_points"] = 100 * (models["crf"]["f1_mean"] - models["softmax"]["f1_mean"])
            out["target"] = "crf >= softmax + 1.0 F1 point on average"
        if ablations:
            out["ablations"] = ablations
        return out

    for seed in args.seeds:
        for name in args.models:
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(tmp)
                if name == "crf":
                    metrics = run_crf(conll, encoder, config, seed, test_s, work)
                elif name in ("softmax", "softmax_our_rates"):
                    metrics = run_softmax(train_s, dev_s, test_s, tags, scheme, encoder, config, seed, work,
                                          our_rates=name == "softmax_our_rates")
                else:
                    metrics = run_bilstm(train_s, dev_s, test_s, tags, scheme, config, seed,
                                         args.bilstm_epochs or config.epochs, args.bilstm_lr)
            results[name].append(metrics)
            log.info("%s seed %d: test F1 %.4f", name, seed, metrics["f1"])
            write_json(args.out, report())
    for name in run_ablations:
        overrides = ABLATIONS[name]
        metrics = run_ablation(name, overrides)
        ablations[name] = {"overrides": overrides, "f1": metrics["f1"],
                           "per_type_f1": {t: m["f1"] for t, m in metrics["per_type"].items()},
                           "command": " ".join(ablation_command(name, overrides))}
        log.info("ablation %s: test F1 %.4f", name, metrics["f1"])
        write_json(args.out, report())
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
