"""The training loop: bucketed batches, differential LRs, warmup, best model by dev F1."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import TypeAdapter, ValidationError
from tqdm import tqdm
from transformers import AutoTokenizer

from dvclive import Live
from pipeline.core import cpu
from pipeline.core.atomic import atomic_dir
from pipeline.core.conll import Sentence, read_conll
from pipeline.core.encoding import DEFAULT_WINDOW_OVERLAP, SpecialIds, special_ids
from pipeline.core.errors import DataError, ParamsError, PipelineError
from pipeline.core.metrics import score
from pipeline.core.tags import allowed_transitions, first_violation
from pipeline.modeling import checkpoint, distributed
from pipeline.modeling.data import Example, bucket_batches, collate, make_examples
from pipeline.modeling.distributed import World
from pipeline.modeling.evaluate import predict_tags
from pipeline.modeling.model import BertBiLstmCrf, HeadConfig, build_model, save_model
from pipeline.modeling.optim import build_optimizer, build_scheduler

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
    plateau_factor: float = 0.5  # schedule: plateau -- rate multiplier when dev F1 stalls
    plateau_patience: int = 1    # epochs without a better dev F1 before the rate drops
    precision: str = "auto"     # auto (bf16 on CUDA if supported, else fp32) | fp32 | bf16 (CPU: hardware bf16) | fp16
    constrain_transitions: bool = True  # forbid transitions the tag scheme rules out (O -> I-X in BIO)
    window_overlap: float = DEFAULT_WINDOW_OVERLAP  # sub-tokens shared by windows of long texts; saved with the model

    @classmethod
    def from_params(cls, section: dict[str, Any]) -> TrainConfig:
        """Check names and types of the section; ``-S train.lr_head=5e-5`` arrives as the string "5e-5".

        YAML reads ``5e-5`` (no dot) as a string, so rates given on the command line are coerced by pydantic's
        lax mode; anything that is not a number where one is needed is an error naming the key.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ParamsError(f"train: unknown keys {unknown}; known: {sorted(known)}")
        try:
            return TypeAdapter(cls).validate_python(section)
        except ValidationError as exc:
            problems = "; ".join(f"train.{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e['input']!r})"
                                 for e in exc.errors())
            raise ParamsError(problems) from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@functools.cache
def cpu_bf16_lstm_works() -> bool:
    """Whether a BiLSTM runs forward and backward under CPU bf16 autocast here (a 3-step probe, cached).

    A probe, not the CPU flags: oneDNN decides by what it dispatches to (``ONEDNN_MAX_CPU_ISA`` included), and
    without hardware bf16 it has no LSTM primitive at all ("could not create a primitive descriptor").
    """
    lstm = torch.nn.LSTM(4, 4, batch_first=True, bidirectional=True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = lstm(torch.randn(1, 3, 4))
        out.float().sum().backward()
    except RuntimeError as exc:
        log.debug("bf16 LSTM probe failed on %s: %s", cpu.describe(), exc)
        return False
    return True


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` on this device (None: plain fp32)."""
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cpu" and not cpu_bf16_lstm_works():
            raise ParamsError(
                f"train.precision: bf16 is not supported on this CPU, {cpu.describe()}: oneDNN has no bf16 LSTM "
                "without hardware bf16 (avx512_bf16 or amx_bf16); use fp32 (or auto, which picks fp32 on CPU)")
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ParamsError("train.precision: fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.float16
    raise ParamsError(f"train.precision: {precision!r} is not one of auto, fp32, bf16, fp16")


def check_tag_sequences(sentences: list[Sentence], scheme: str, path: Path) -> None:
    """Constrained transitions make a forbidden gold sequence unlearnable: say where it is."""
    for n, sent in enumerate(sentences, start=1):
        bad = first_violation(sent.tags, scheme)
        if bad is not None:
            before = sent.tags[bad - 1] if bad else "the sentence start"
            raise DataError(
                f"{path}: sentence {n} (task {sent.task_id}), word {bad + 1} {sent.tokens[bad]!r}: tag "
                f"{sent.tags[bad]!r} after {before!r} is not valid {scheme}; fix the data or set "
                "train.constrain_transitions: false")


@dataclass
class Corpus:
    """Train and dev sentences encoded for one model, with what is needed to decode and save."""

    labels: dict
    train_sents: list[Sentence]
    dev_sents: list[Sentence]
    train_ex: list[Example]
    dev_ex: list[Example]
    specials: SpecialIds
    hf_tokenizer: Any


def prepare(conll_dir: str | Path, encoder_dir: str | Path, config: TrainConfig,
            device: torch.device) -> tuple[BertBiLstmCrf, Corpus]:
    """The model (pretrained weights in, on ``device``) and the encoded data; shared by train and lr-find."""
    conll_dir = Path(conll_dir)
    labels = json.loads((conll_dir / "labels.json").read_text(encoding="utf-8"))
    tags: list[str] = labels["tags"]
    tag_to_id = {t: i for i, t in enumerate(tags)}
    train_sents = list(read_conll(conll_dir / "train.conll"))
    dev_sents = list(read_conll(conll_dir / "dev.conll"))
    if not train_sents:
        raise PipelineError(f"{conll_dir / 'train.conll'} holds no sentences: nothing to train on")
    if config.constrain_transitions:
        check_tag_sequences(train_sents, labels["scheme"], conll_dir / "train.conll")

    hf_tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
    tokenizer = hf_tokenizer.backend_tokenizer
    tokenizer.no_padding()
    tokenizer.no_truncation()
    specials = special_ids(tokenizer)

    head = HeadConfig(num_tags=len(tags), lstm_hidden=config.lstm_hidden, lstm_layers=config.lstm_layers,
                      dropout=config.dropout, max_length=config.max_length)
    model = build_model(encoder_dir, head, pretrained=config.pretrained)
    max_len = min(config.max_length, model.bert.config.max_position_embeddings)
    # saved with the model: evaluation, export and serving cut long texts into the same windows
    model.head_config = replace(head, max_length=max_len, window_overlap=config.window_overlap)
    model.to(device)
    if config.constrain_transitions:
        model.forbid_transitions(*allowed_transitions(tags, labels["scheme"]))

    def encode(sentences: list[Sentence]) -> list[Example]:
        return make_examples(sentences, tokenizer, specials, tag_to_id, max_len, config.window_overlap,
                             labels["scheme"])

    train_ex, dev_ex = encode(train_sents), encode(dev_sents)
    windowed = len(train_ex) - len(train_sents)
    log.info("train: %d sentences (%d examples%s), dev: %d sentences", len(train_sents), len(train_ex),
             f"; {windowed} extra overlapping windows for sentences over {max_len} sub-tokens" if windowed else "",
             len(dev_sents))
    return model, Corpus(labels, train_sents, dev_sents, train_ex, dev_ex, specials, hf_tokenizer)


class Objective(torch.nn.Module):
    """Emissions and the summed CRF loss in one ``forward``, the shape DDP wraps."""

    def __init__(self, model: BertBiLstmCrf) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, word_index: torch.Tensor,
                word_mask: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        emissions = self.model(input_ids, attention_mask, word_index, word_mask)
        return self.model.loss(emissions, tags, word_mask, reduction="sum")


class _NoLive:
    """DVCLive for ranks other than 0: they train, rank 0 logs."""

    def __init__(self) -> None:
        self.summary: dict[str, Any] = {}
        self.step = 0

    def log_metric(self, *args: Any, **kwargs: Any) -> None:
        pass

    def next_step(self) -> None:
        pass


@contextlib.contextmanager
def _live(world: World, live_dir: str | Path, resume: bool) -> Iterator[Any]:
    if not world.is_main:
        yield _NoLive()
        return
    with Live(str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None, resume=resume) as live:
        yield live


def _lr_groups(optimizer: torch.optim.Optimizer) -> list[tuple[str, int]]:
    """One DVCLive series per distinct rate: ``encoder``, ``head``, ``crf`` (or one per encoder layer)."""
    seen: dict[str, int] = {}
    for i, group in enumerate(optimizer.param_groups):
        seen.setdefault(group["name"].replace(" (no decay)", ""), i)
    return list(seen.items())


def train(conll_dir: str | Path, encoder_dir: str | Path, model_dir: str | Path, live_dir: str | Path,
          config: TrainConfig, seed: int, checkpoint_dir: str | Path | None = None) -> dict[str, Any]:
    world = distributed.start(config.device)
    if world.size > 1:
        log.info("rank %d of %d on %s", world.rank, world.size, world.device)
        if not world.is_main:  # one log for the run: rank 0's
            logging.getLogger("pipeline").setLevel(logging.WARNING)
    try:
        return _train(world, Path(conll_dir), encoder_dir, model_dir, live_dir, config, seed, checkpoint_dir)
    finally:
        distributed.stop(world)


def _train(world: World, conll_dir: Path, encoder_dir: str | Path, model_dir: str | Path, live_dir: str | Path,
           config: TrainConfig, seed: int, checkpoint_dir: str | Path | None) -> dict[str, Any]:
    seed_everything(seed)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    torch.set_flush_denormal(True)  # BiLSTM-CRF steps are ~3x faster on CPU with denormals flushed
    device = world.device
    amp_dtype = autocast_dtype(config.precision, device)
    model, data = prepare(conll_dir, encoder_dir, config, device)
    labels, specials, train_ex = data.labels, data.specials, data.train_ex
    objective = Objective(model)
    if world.size > 1:
        objective = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[device] if device.type == "cuda" else None)

    rng = random.Random(seed)  # same seed on every rank: all ranks cut the same batches
    steps_per_epoch = math.ceil(math.ceil(len(train_ex) / config.batch_size) / config.grad_accumulation)
    total_steps = steps_per_epoch * config.epochs
    optimizer = build_optimizer(model, lr_encoder=config.lr_encoder, lr_head=config.lr_head, lr_crf=config.lr_crf,
                                weight_decay=config.weight_decay, layer_decay=config.layer_decay)
    scheduler = build_scheduler(optimizer, config.schedule, total_steps, config.warmup, config.plateau_factor,
                                config.plateau_patience)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    lr_series = _lr_groups(optimizer)
    log.info("%d optimizer steps (%d per epoch), precision %s", total_steps, steps_per_epoch,
             str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32")

    best_f1, best_epoch, stale = -1.0, -1, 0
    history: list[dict[str, Any]] = []
    start_epoch, start_batch, step, batches = 0, 0, 0, None
    total_loss, seen = 0.0, 0
    bad_in_a_row, skipped = 0, 0
    run_id = checkpoint.fingerprint(
        {"seed": seed, "encoder": str(encoder_dir), "world": world.size,
         **{k: v for k, v in asdict(config).items() if k not in ("device", "threads", "eval_batch_size", "resume")}},
        [conll_dir / "train.conll", conll_dir / "dev.conll", conll_dir / "labels.json"])
    resumed = checkpoint.load_resumable(checkpoint_dir, run_id) \
        if checkpoint_dir and config.resume == "auto" else None
    if resumed:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        checkpoint.restore_rng(rng, resumed["rng"])
        start_epoch, start_batch, step, batches = resumed["epoch"], resumed["batch"], resumed["step"], \
            resumed["batches"]
        best_f1, best_epoch, stale, history = resumed["best_f1"], resumed["best_epoch"], resumed["stale"], \
            resumed["history"]
        total_loss, seen = resumed["total_loss"], resumed["seen"]

    def save_checkpoint(epoch: int, batch: int, completed: bool = False) -> None:
        if not checkpoint_dir or not world.is_main:
            return
        checkpoint.save(checkpoint_dir, {
            "fingerprint": run_id, "epoch": epoch, "batch": batch, "step": step, "completed": completed,
            "batches": batches, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": checkpoint.rng_state(rng),
            "best_f1": best_f1, "best_epoch": best_epoch, "stale": stale, "history": history,
            "total_loss": total_loss, "seen": seen})

    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    with _live(world, live_dir, bool(resumed)) as live:
        if resumed:  # not DVCLive's count: dvc repro deleted its files, a killed run logged past its checkpoint
            live.step = step
        for epoch in range(start_epoch, config.epochs):
            model.train()
            if batches is None:  # a new epoch (None after each epoch, and unless resumed mid-epoch)
                batches = bucket_batches(train_ex, config.batch_size, rng)
                total_loss, seen = 0.0, 0
            first, start_batch = start_batch, 0  # only the resumed epoch starts part-way
            optimizer.zero_grad(set_to_none=True)
            bar = tqdm(range(first, len(batches)), desc=f"epoch {epoch + 1}/{config.epochs}", mininterval=2.0,
                       leave=False, disable=not world.is_main)
            for i in bar:
                mine, weight = world.shard(batches[i])
                batch = {k: v.to(device) for k, v in collate([train_ex[j] for j in mine], specials.pad).items()}
                with autocast:
                    loss_sum = objective(**batch)
                # weight makes the ranks' gradients, averaged by DDP, the gradient of the global batch mean
                finite = bool(torch.isfinite(loss_sum))
                scaler.scale(loss_sum * (weight / config.grad_accumulation)).backward()
                if finite and weight:
                    total_loss += loss_sum.item()
                    seen += len(mine)
                if (i + 1) % config.grad_accumulation == 0 or i + 1 == len(batches):
                    scaler.unscale_(optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                    if not torch.isfinite(norm):
                        # a NaN/inf step would poison the weights: drop it, and stop if it keeps happening
                        if scaler.is_enabled():
                            scaler.step(optimizer)  # sees the inf and skips; update() then lowers the scale
                            scaler.update()
                        optimizer.zero_grad(set_to_none=True)
                        skipped += 1
                        if scaler.is_enabled() and finite:
                            continue  # an fp16 overflow: the scaler's business, not divergence
                        bad_in_a_row += 1
                        log.warning("skipped an optimizer step: %s is not finite (%d in a row)",
                                    "loss" if not finite else "gradient norm", bad_in_a_row)
                        if bad_in_a_row >= config.max_bad_steps:
                            raise TrainingDiverged(
                                f"loss or gradients were not finite for {bad_in_a_row} optimizer steps in a row "
                                f"(epoch {epoch + 1}); lower the learning rates (train.lr_*) or check the data")
                        continue
                    bad_in_a_row = 0
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    step_loss = world.sum(loss_sum.item() if weight else 0.0) / len(batches[i])
                    live.log_metric("train/loss", step_loss)
                    for name, g in lr_series:
                        live.log_metric(f"train/lr/{name}", optimizer.param_groups[g]["lr"])
                    live.next_step()
                    if config.checkpoint_every and step % config.checkpoint_every == 0 and i + 1 < len(batches):
                        save_checkpoint(epoch, i + 1)
                    bar.set_postfix(loss=f"{step_loss:.3f}")
            dev = None
            if world.is_main:
                dev_pred = predict_tags(model, data.dev_ex, len(data.dev_sents), labels["tags"], specials.pad,
                                        config.eval_batch_size, device)
                dev = score([s.tags for s in data.dev_sents], dev_pred, labels["scheme"])
            dev = world.from_main(dev)
            train_loss = world.sum(total_loss) / max(world.sum(seen), 1)
            scheduler.epoch_end(dev["f1"])
            live.log_metric("dev/f1", dev["f1"])
            live.log_metric("dev/precision", dev["precision"])
            live.log_metric("dev/recall", dev["recall"])
            live.log_metric("train/epoch_loss", train_loss)
            history.append({"epoch": epoch + 1, "train_loss": train_loss, "dev_f1": dev["f1"]})
            log.info("epoch %d: train loss %.4f, dev F1 %.4f", epoch + 1, train_loss, dev["f1"])
            stop = False
            if dev["f1"] > best_f1:
                best_f1, best_epoch, stale = dev["f1"], epoch + 1, 0
                if world.is_main:
                    save_best(model, labels, data.hf_tokenizer, model_dir)
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
                   "optimizer_steps": step, "skipped_steps": skipped}
        for key, value in summary.items():
            live.summary[key] = value
    if world.is_main:
        log.info("best dev F1 %.4f at epoch %d; model in %s", best_f1, best_epoch, model_dir)
    return summary


def save_best(model: BertBiLstmCrf, labels: dict, hf_tokenizer: Any, model_dir: str | Path) -> None:
    """Swap in a complete model folder, so a crash never leaves half a model."""
    with atomic_dir(model_dir) as tmp:
        save_model(model, tmp, labels)
        hf_tokenizer.save_pretrained(str(tmp))
