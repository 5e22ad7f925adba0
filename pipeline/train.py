"""The training loop: bucketed batches, differential LRs, warmup, best model by dev F1."""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dvclive import Live
from tqdm import tqdm
from transformers import AutoTokenizer

from pipeline import checkpoint
from pipeline.atomic import atomic_dir
from pipeline.conll import read_conll
from pipeline.data import bucket_batches, collate, make_examples
from pipeline.encoding import special_ids
from pipeline.errors import ParamsError, PipelineError
from pipeline.evaluate import predict_tags, score
from pipeline.model import BertBiLstmCrf, HeadConfig, build_model, save_model
from pipeline.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


class TrainingDiverged(PipelineError):
    """Loss or gradients stayed NaN/inf: the rates are too high or the data is broken."""


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of the ``train`` section of params.yaml."""

    epochs: int = 6
    batch_size: int = 32
    grad_accumulation: int = 1
    max_length: int = 512
    lr_encoder: float = 5e-5
    lr_head: float = 1e-3
    lr_crf: float = 1e-2
    layer_decay: float = 1.0
    weight_decay: float = 0.01
    schedule: str = "linear"
    warmup: float = 0.1
    grad_clip: float = 1.0
    patience: int = 3
    lstm_hidden: int = 256
    lstm_layers: int = 1
    dropout: float = 0.1
    pretrained: bool = True
    device: str = "auto"
    threads: int = 0
    eval_batch_size: int = 64
    max_bad_steps: int = 5      # consecutive non-finite losses or gradients before the run stops
    checkpoint_every: int = 0   # optimizer steps between checkpoints (0: at epoch ends only)
    resume: str = "auto"        # auto: continue this run's last checkpoint | never

    @classmethod
    def from_params(cls, section: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ParamsError(f"train: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**section)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ParamsError(f"train.device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def train(conll_dir: str | Path, encoder_dir: str | Path, model_dir: str | Path, live_dir: str | Path,
          config: TrainConfig, seed: int, checkpoint_dir: str | Path | None = None) -> dict[str, Any]:
    conll_dir = Path(conll_dir)
    seed_everything(seed)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    torch.set_flush_denormal(True)  # BiLSTM-CRF steps are ~3x faster on CPU with denormals flushed
    device = pick_device(config.device)

    labels = json.loads((conll_dir / "labels.json").read_text(encoding="utf-8"))
    tags: list[str] = labels["tags"]
    tag_to_id = {t: i for i, t in enumerate(tags)}
    train_sents = list(read_conll(conll_dir / "train.conll"))
    dev_sents = list(read_conll(conll_dir / "dev.conll"))
    if not train_sents:
        raise PipelineError(f"{conll_dir / 'train.conll'} holds no sentences: nothing to train on")

    hf_tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
    tokenizer = hf_tokenizer.backend_tokenizer
    tokenizer.no_padding()
    tokenizer.no_truncation()
    specials = special_ids(tokenizer)

    head = HeadConfig(num_tags=len(tags), lstm_hidden=config.lstm_hidden, lstm_layers=config.lstm_layers,
                      dropout=config.dropout, max_length=config.max_length)
    model = build_model(encoder_dir, head, pretrained=config.pretrained)
    max_len = min(config.max_length, model.bert.config.max_position_embeddings)
    model.head_config = replace(head, max_length=max_len)  # saved with the model: inference windows by it
    model.to(device)

    train_ex = make_examples(train_sents, tokenizer, specials, tag_to_id, max_len)
    dev_ex = make_examples(dev_sents, tokenizer, specials, tag_to_id, max_len)
    log.info("train: %d sentences (%d examples), dev: %d sentences", len(train_sents), len(train_ex), len(dev_sents))

    rng = random.Random(seed)
    steps_per_epoch = math.ceil(math.ceil(len(train_ex) / config.batch_size) / config.grad_accumulation)
    total_steps = steps_per_epoch * config.epochs
    optimizer = build_optimizer(model, lr_encoder=config.lr_encoder, lr_head=config.lr_head, lr_crf=config.lr_crf,
                                weight_decay=config.weight_decay, layer_decay=config.layer_decay)
    scheduler = build_scheduler(optimizer, config.schedule, total_steps, config.warmup)

    best_f1, best_epoch, stale = -1.0, -1, 0
    history: list[dict[str, Any]] = []
    start_epoch, start_batch, step, batches = 0, 0, 0, None
    total_loss, seen = 0.0, 0
    bad_in_a_row, skipped = 0, 0
    run_id = checkpoint.fingerprint(
        {"seed": seed, "encoder": str(encoder_dir),
         **{k: v for k, v in asdict(config).items() if k not in ("device", "threads", "eval_batch_size", "resume")}},
        [conll_dir / "train.conll", conll_dir / "dev.conll", conll_dir / "labels.json"])
    resumed = checkpoint.load_resumable(checkpoint_dir, run_id) \
        if checkpoint_dir and config.resume == "auto" else None
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        checkpoint.restore_rng(rng, resumed["rng"])
        start_epoch, start_batch, step, batches = resumed["epoch"], resumed["batch"], resumed["step"], \
            resumed["batches"]
        best_f1, best_epoch, stale, history = resumed["best_f1"], resumed["best_epoch"], resumed["stale"], \
            resumed["history"]
        total_loss, seen = resumed["total_loss"], resumed["seen"]

    def save_checkpoint(epoch: int, batch: int, completed: bool = False) -> None:
        if not checkpoint_dir:
            return
        checkpoint.save(checkpoint_dir, {
            "fingerprint": run_id, "epoch": epoch, "batch": batch, "step": step, "completed": completed,
            "batches": batches, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": checkpoint.rng_state(rng), "best_f1": best_f1,
            "best_epoch": best_epoch, "stale": stale, "history": history, "total_loss": total_loss,
            "seen": seen})

    with Live(str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None, resume=bool(resumed)) as live:
        for epoch in range(start_epoch, config.epochs):
            model.train()
            if batches is None:  # a new epoch (None after each epoch, and unless resumed mid-epoch)
                batches = bucket_batches(train_ex, config.batch_size, rng)
                total_loss, seen = 0.0, 0
            first, start_batch = start_batch, 0  # only the resumed epoch starts part-way
            optimizer.zero_grad(set_to_none=True)
            bar = tqdm(range(first, len(batches)), desc=f"epoch {epoch + 1}/{config.epochs}", mininterval=2.0,
                       leave=False)
            for i in bar:
                idx = batches[i]
                batch = {k: v.to(device) for k, v in collate([train_ex[j] for j in idx], specials.pad).items()}
                emissions = model(batch["input_ids"], batch["attention_mask"], batch["word_index"],
                                  batch["word_mask"])
                loss = model.loss(emissions, batch["tags"], batch["word_mask"])
                finite = bool(torch.isfinite(loss))
                if finite:
                    (loss / config.grad_accumulation).backward()
                    total_loss += loss.item() * len(idx)
                    seen += len(idx)
                if (i + 1) % config.grad_accumulation == 0 or i + 1 == len(batches):
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                    if not finite or not torch.isfinite(norm):
                        # a NaN/inf step would poison the weights: drop it, and stop if it keeps happening
                        optimizer.zero_grad(set_to_none=True)
                        bad_in_a_row += 1
                        skipped += 1
                        log.warning("skipped an optimizer step: %s is not finite (%d in a row)",
                                    "loss" if not finite else "gradient norm", bad_in_a_row)
                        if bad_in_a_row >= config.max_bad_steps:
                            raise TrainingDiverged(
                                f"loss or gradients were not finite for {bad_in_a_row} optimizer steps in a row "
                                f"(epoch {epoch + 1}); lower the learning rates (train.lr_*) or check the data")
                        continue
                    bad_in_a_row = 0
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    live.log_metric("train/loss", loss.item())
                    live.log_metric("train/lr_encoder", optimizer.param_groups[0]["lr"])
                    live.next_step()
                    if config.checkpoint_every and step % config.checkpoint_every == 0 and i + 1 < len(batches):
                        save_checkpoint(epoch, i + 1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            dev_pred = predict_tags(model, dev_ex, len(dev_sents), tags, specials.pad, config.eval_batch_size, device)
            dev = score([s.tags for s in dev_sents], dev_pred, labels["scheme"])
            train_loss = total_loss / max(seen, 1)
            live.log_metric("dev/f1", dev["f1"])
            live.log_metric("train/epoch_loss", train_loss)
            history.append({"epoch": epoch + 1, "train_loss": train_loss, "dev_f1": dev["f1"]})
            log.info("epoch %d: train loss %.4f, dev F1 %.4f", epoch + 1, train_loss, dev["f1"])
            stop = False
            if dev["f1"] > best_f1:
                best_f1, best_epoch, stale = dev["f1"], epoch + 1, 0
                save_best(model, labels, hf_tokenizer, model_dir)
            else:
                stale += 1
                if stale >= config.patience:
                    log.info("early stop: dev F1 has not improved for %d epochs", stale)
                    stop = True
            batches = None
            save_checkpoint(epoch + 1, 0, completed=stop or epoch + 1 == config.epochs)
            if stop:
                break
        summary = {"best_dev_f1": best_f1, "best_epoch": best_epoch, "epochs_run": len(history),
                   "skipped_steps": skipped}
        for key, value in summary.items():
            live.summary[key] = value
    log.info("best dev F1 %.4f at epoch %d; model in %s", best_f1, best_epoch, model_dir)
    return summary


def save_best(model: BertBiLstmCrf, labels: dict, hf_tokenizer: Any, model_dir: str | Path) -> None:
    """Swap in a complete model folder, so a crash never leaves half a model."""
    with atomic_dir(model_dir) as tmp:
        save_model(model, tmp, labels)
        hf_tokenizer.save_pretrained(str(tmp))


def main(params: dict[str, Any]) -> None:
    paths = params["paths"]
    train(paths["conll_dir"], paths["encoder"], paths["model_dir"], paths["train_live"],
          TrainConfig.from_params(params["train"]), params["seed"], paths.get("checkpoint_dir"))
