"""Training throughput: our train stage vs Hugging Face ``Trainer`` + ``BertForTokenClassification``.

Same encoder weights, same training sentences in the same sub-tokens, same
batch size, epochs, peak rate and warmup, same device and threads; each side
runs one epoch from a cold start (model built, data encoded), alternating
ours/HF for ``--repeats`` rounds, best round kept. The figure is training
tokens (real sub-tokens, [CLS]/[SEP] included, padding excluded) per second.
Ours pays for a BiLSTM and a CRF on top of the encoder; it wins back time by
length-bucketed batches, where ``Trainer``'s default sampler pads every
random batch to its longest sentence. ``hf_trainer_group_by_length`` is the
strongest ``Trainer`` setting (``train_sampling_strategy="group_by_length"``,
its ``LengthGroupedSampler``): it pads little too, so it is the one to beat.
Writes benchmarks/results/train.json.

    .venv/bin/python benchmarks/train.py                    # after `dvc repro convert`
    .venv/bin/python benchmarks/train.py --sentences 256 --repeats 1
    .venv/bin/python benchmarks/train.py --device cuda      # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from hf_token_classification import label_first_subtokens  # benchmarks/, this script's folder

from pipeline.core.atomic import write_json
from pipeline.core.conll import read_conll, write_conll
from pipeline.core.cpu import cpu_info
from pipeline.core.encoding import load_tokenizer, word_pieces
from pipeline.core.params import load_params
from pipeline.modeling.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.train")


def subset(conll_dir: Path, n: int, out: Path) -> list:
    """The first ``n`` training sentences (fixed shuffle) as a conll folder; a tiny dev set keeps eval cheap."""
    sentences = list(read_conll(conll_dir / "train.conll"))
    random.Random(0).shuffle(sentences)
    sentences = sentences[:n]
    out.mkdir(parents=True, exist_ok=True)
    write_conll(out / "train.conll", sentences)
    write_conll(out / "dev.conll", sentences[:8])
    shutil.copy2(conll_dir / "labels.json", out / "labels.json")
    return sentences


def count_tokens(sentences: list, encoder: Path, max_length: int) -> int:
    tokenizer, specials = load_tokenizer(encoder)
    return sum(min(sum(len(p) for p in word_pieces(tokenizer, specials, s.tokens, max_length - 2)) + 2,
                   max_length) for s in sentences)


def run_ours(conll: Path, encoder: Path, config: TrainConfig, work: Path) -> float:
    start = time.perf_counter()
    train(conll, encoder, work / "model", work / "live", config, seed=0)
    return time.perf_counter() - start


def run_hf(sentences: list, tags: list[str], encoder: Path, config: TrainConfig, device: str, work: Path,
           sampling: str = "random") -> float:
    from transformers import (
        AutoTokenizer,
        BertForTokenClassification,
        DataCollatorForTokenClassification,
        Trainer,
        TrainingArguments,
    )

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(encoder))
    rows = label_first_subtokens(tokenizer, sentences, tags, config.max_length)
    model = BertForTokenClassification.from_pretrained(str(encoder), num_labels=len(tags))
    args = TrainingArguments(
        output_dir=str(work / "hf"), per_device_train_batch_size=config.batch_size, num_train_epochs=1,
        learning_rate=config.lr_encoder, warmup_steps=config.warmup, weight_decay=config.weight_decay,
        max_grad_norm=config.grad_clip, lr_scheduler_type="linear", save_strategy="no", logging_strategy="no",
        report_to=[], disable_tqdm=True, seed=0, dataloader_num_workers=0, use_cpu=device == "cpu",
        train_sampling_strategy=sampling)
    Trainer(model=model, args=args, train_dataset=rows,
            data_collator=DataCollatorForTokenClassification(tokenizer)).train()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("pipeline").setLevel(logging.WARNING)

    params = load_params(ROOT / "params.yaml")
    conll_dir = ROOT / params["paths"]["conll_dir"]
    encoder = ROOT / params["paths"]["encoder"]
    if not (conll_dir / "train.conll").is_file():
        raise SystemExit(f"{conll_dir}/train.conll not found: run `dvc repro convert` first")
    config = replace(TrainConfig.from_params(params["train"]), epochs=1, device=args.device, resume="never",
                     max_length=min(params["train"]["max_length"], 512))
    tags = json.loads((conll_dir / "labels.json").read_text())["tags"]
    runners = {
        "ours": lambda run_dir: run_ours(work / "conll", encoder, config, run_dir),
        "hf_trainer": lambda run_dir: run_hf(sentences, tags, encoder, config, args.device, run_dir),
        "hf_trainer_group_by_length": lambda run_dir: run_hf(sentences, tags, encoder, config, args.device, run_dir,
                                                             sampling="group_by_length"),
    }
    results: dict[str, list[float]] = {name: [] for name in runners}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sentences = subset(conll_dir, args.sentences, work / "conll")
        tokens = count_tokens(sentences, encoder, config.max_length)
        for round_ in range(args.repeats):
            for name in list(runners) if round_ % 2 == 0 else reversed(list(runners)):
                run_dir = work / f"{name}-{round_}"
                run_dir.mkdir()
                seconds = runners[name](run_dir)
                results[name].append(seconds)
                log.info("%s round %d: %.1f s, %.0f tokens/s", name, round_ + 1, seconds, tokens / seconds)
    best = {name: min(times) for name, times in results.items()}
    report = {
        "what": "training tokens/s, one epoch from a cold start, best of rounds",
        "device": args.device, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": platform.platform(), "cpu": cpu_info(), "sentences": len(sentences), "tokens": tokens,
        "batch_size": config.batch_size, "encoder": params["paths"]["encoder"],
        "seconds": results,
        "tokens_per_s": {name: tokens / s for name, s in best.items()},
        "ratio_ours_vs_hf_trainer": best["hf_trainer"] / best["ours"],
        "ratio_ours_vs_hf_trainer_group_by_length": best["hf_trainer_group_by_length"] / best["ours"],
        "targets": {"ratio_ours_vs_hf_trainer": 1.4, "ratio_ours_vs_hf_trainer_group_by_length": 1.0},
    }
    write_json(args.out, report)
    log.info("ours %.0f tokens/s vs HF Trainer %.0f (%.2fx, target 1.4x) and Trainer group_by_length %.0f "
             "(%.2fx, target 1.0x) -> %s", report["tokens_per_s"]["ours"], report["tokens_per_s"]["hf_trainer"],
             report["ratio_ours_vs_hf_trainer"], report["tokens_per_s"]["hf_trainer_group_by_length"],
             report["ratio_ours_vs_hf_trainer_group_by_length"], args.out)


if __name__ == "__main__":
    main()
