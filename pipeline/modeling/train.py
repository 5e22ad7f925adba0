"""The training loop: bucketed batches, differential LRs, warmup, best model by dev F1."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
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
from pipeline.core.errors import DataError, ModelLoadError, ParamsError, PipelineError
from pipeline.core.metrics import score
from pipeline.core.tags import allowed_transitions, first_violation
from pipeline.modeling import checkpoint, distributed
from pipeline.modeling.data import Example, bucket_batches, collate, make_examples
from pipeline.modeling.diagnose import Origin, trace_origin
from pipeline.modeling.distributed import World
from pipeline.modeling.evaluate import predict_tags
from pipeline.modeling.model import BertBiLstmCrf, HeadConfig, build_model, load_model, save_model
from pipeline.modeling.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


class TrainingDiverged(PipelineError):
    """Loss or gradients stayed NaN/inf: the rates are too high or the data is broken."""


class OutOfDeviceMemory(PipelineError):
    """A batch did not fit on the device even split down to one example (or could not be split: torchrun)."""


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
    init_from: str = ""         # a trained model folder (models/best) to start from: a warm start; "": the encoder

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


def warm_start(model: BertBiLstmCrf, init_dir: Path, tags: list[str]) -> None:
    """Start from a trained model's weights (``train.init_from``): same tags and head shape, or a one-line error."""
    try:
        trained, labels = load_model(init_dir)
    except ModelLoadError as exc:
        raise ParamsError(f"train.init_from: {exc}") from None
    if labels.get("tags") != tags:
        raise ParamsError(f"train.init_from: {init_dir} was trained on the tags {labels.get('tags')}, the data has "
                          f"{tags}; train from the encoder (train.init_from: \"\") when the labels change")
    try:
        model.load_state_dict(trained.state_dict())
    except RuntimeError as exc:  # a head of another size (lstm_hidden, lstm_layers) or another encoder
        raise ParamsError(f"train.init_from: {init_dir} does not fit this model: {str(exc).splitlines()[0]}; "
                          "use the same train.lstm_hidden, lstm_layers and encoder") from None
    log.info("warm start from %s", init_dir)


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


def _line_of_word(path: Path, sentence: int, word: int) -> int | None:
    """The file line of a sentence's word (both 1-based), found again only for an error message.

    ``read_conll`` keeps no line numbers; this walks the file with its block rules (blank lines end a
    sentence, ``# `` comments and ``-DOCSTART-`` are not words).
    """
    done, rows = 0, 0
    with path.open(encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                done, rows = done + (rows > 0), 0
            elif not line.startswith(("# ", "-DOCSTART-")):
                rows += 1
                if done + 1 == sentence and rows == word:
                    return lineno
    return None


def check_known_tags(sentences: list[Sentence], tags: list[str], path: Path) -> None:
    """Every gold tag must be one of labels.json's: an unknown one would reach the CRF as a bad id.

    There it fails deep inside the loss, and on CUDA as an opaque "device-side assert"; here it is one line
    naming the file, sentence, line, task and word.
    """
    known = set(tags)
    for n, sent in enumerate(sentences, start=1):
        bad = next((i for i, tag in enumerate(sent.tags) if tag not in known), None)
        if bad is None:
            continue
        line = _line_of_word(path, n, bad + 1)
        task = "" if sent.task_id.startswith(f"{path.name}:") else f", task {sent.task_id}"
        raise DataError(
            f"{path}: sentence {n} (line {line}{task}), word {bad + 1} {sent.tokens[bad]!r}: tag "
            f"{sent.tags[bad]!r} is not in labels.json's tag set {tags}; convert again or fix the file")


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
    check_known_tags(train_sents, tags, conll_dir / "train.conll")
    check_known_tags(dev_sents, tags, conll_dir / "dev.conll")
    if config.constrain_transitions:
        check_tag_sequences(train_sents, labels["scheme"], conll_dir / "train.conll")

    hf_tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
    tokenizer = hf_tokenizer.backend_tokenizer
    tokenizer.no_padding()
    tokenizer.no_truncation()
    specials = special_ids(tokenizer)

    head = HeadConfig(num_tags=len(tags), lstm_hidden=config.lstm_hidden, lstm_layers=config.lstm_layers,
                      dropout=config.dropout, max_length=config.max_length)
    model = build_model(encoder_dir, head, pretrained=config.pretrained and not config.init_from)
    if config.init_from:
        warm_start(model, Path(config.init_from), tags)
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
        run = TrainingRun(world, Path(conll_dir), encoder_dir, model_dir, config, seed, checkpoint_dir)
        with _live(world, live_dir, run.resumed) as live:
            return run.fit(live)
    finally:
        distributed.stop(world)


@dataclass
class Progress:
    """Where a run stands: what a checkpoint saves besides the weights, optimizer, schedule, scaler and RNG."""

    epoch: int = 0                   # the epoch to run next (0-based; a mid-epoch checkpoint: the current one)
    batch: int = 0                   # batches of the current epoch done (a mid-epoch checkpoint)
    step: int = 0                    # optimizer steps taken
    batches: list | None = None      # the current epoch's batches (None: the next epoch cuts new ones)
    best_f1: float = -1.0
    best_epoch: int = -1
    stale: int = 0                   # epochs since dev F1 last improved
    history: list[dict[str, Any]] = field(default_factory=list)
    total_loss: float = 0.0          # this epoch's summed loss and sentences, for its mean
    seen: int = 0


class TrainingRun:
    """One training run: the model, its optimizer and schedule, and the loop, in named steps.

    Built once (seeded, resumed from a checkpoint of the same run if there is one), then :meth:`fit` runs
    the epochs: batches -> :meth:`_accumulate` (forward and backward) -> :meth:`_optimizer_step` (or a
    skipped non-finite step) -> :meth:`_end_epoch` (dev F1, best model, early stop, checkpoint).
    """

    def __init__(self, world: World, conll_dir: Path, encoder_dir: str | Path, model_dir: str | Path,
                 config: TrainConfig, seed: int, checkpoint_dir: str | Path | None) -> None:
        seed_everything(seed)
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        torch.set_flush_denormal(True)  # BiLSTM-CRF steps are ~3x faster on CPU with denormals flushed
        self.world, self.config, self.model_dir, self.checkpoint_dir = world, config, model_dir, checkpoint_dir
        device = self.device = world.device
        self.amp_dtype = autocast_dtype(config.precision, device)
        self.model, self.data = prepare(conll_dir, encoder_dir, config, device)
        self.objective: torch.nn.Module = Objective(self.model)
        if world.size > 1:
            self.objective = torch.nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[device] if device.type == "cuda" else None)
        self.rng = random.Random(seed)  # same seed on every rank: all ranks cut the same batches
        batches_per_epoch = math.ceil(len(self.data.train_ex) / config.batch_size)
        steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accumulation)
        total_steps = steps_per_epoch * config.epochs
        self.optimizer = build_optimizer(self.model, lr_encoder=config.lr_encoder, lr_head=config.lr_head,
                                         lr_crf=config.lr_crf, weight_decay=config.weight_decay,
                                         layer_decay=config.layer_decay)
        self.scheduler = build_scheduler(self.optimizer, config.schedule, total_steps, config.warmup,
                                         config.plateau_factor, config.plateau_patience)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype is torch.float16)
        self.autocast = torch.autocast(device.type, dtype=self.amp_dtype or torch.float32,
                                       enabled=self.amp_dtype is not None)
        self.lr_series = _lr_groups(self.optimizer)
        log.info("%d optimizer steps (%d per epoch), precision %s", total_steps, steps_per_epoch,
                 str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32")
        self.progress = Progress()
        self.bad_in_a_row, self.skipped = 0, 0
        self.step_pieces: list[tuple[list[int], float]] = []  # (examples, loss scale) in this step's gradient
        self.grads_dirty = False    # a backward failed part-way: the gradient may hold part of it
        self.oom_sizes: set[int] = set()  # batch sizes already reported as out of memory (log once)
        self.run_id = checkpoint.fingerprint(
            {"seed": seed, "encoder": str(encoder_dir), "world": world.size,
             **{k: v for k, v in asdict(config).items() if k not in ("device", "threads", "eval_batch_size",
                                                                       "resume")}},
            [conll_dir / "train.conll", conll_dir / "dev.conll", conll_dir / "labels.json"])
        self.resumed = self._resume()

    # -- checkpoints -------------------------------------------------------------------------------------

    def _resume(self) -> bool:
        """Continue this run's last checkpoint (same fingerprint) when ``train.resume: auto``."""
        if not self.checkpoint_dir or self.config.resume != "auto":
            return False
        saved = checkpoint.load_resumable(self.checkpoint_dir, self.run_id)
        if not saved:
            return False
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        checkpoint.restore_rng(self.rng, saved["rng"])
        self.progress = Progress(**{f.name: saved[f.name] for f in fields(Progress)})
        return True

    def _save_checkpoint(self, epoch: int, batch: int, completed: bool = False) -> None:
        if not self.checkpoint_dir or not self.world.is_main:
            return
        state = asdict(self.progress) | {"epoch": epoch, "batch": batch}
        checkpoint.save(self.checkpoint_dir, {
            "fingerprint": self.run_id, "completed": completed, **state, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": checkpoint.rng_state(self.rng)})

    # -- the loop ----------------------------------------------------------------------------------------

    def fit(self, live: Any) -> dict[str, Any]:
        """Run the epochs left; the summary also goes to DVCLive."""
        progress = self.progress
        if self.resumed:  # not DVCLive's count: dvc repro deleted its files, a killed run logged past its checkpoint
            live.step = progress.step
        for epoch in range(progress.epoch, self.config.epochs):
            self._train_epoch(epoch, live)
            if self._end_epoch(epoch, live):
                break
        summary = {"best_dev_f1": progress.best_f1, "best_epoch": progress.best_epoch,
                   "epochs_run": len(progress.history), "optimizer_steps": progress.step,
                   "skipped_steps": self.skipped}
        for key, value in summary.items():
            live.summary[key] = value
        if self.world.is_main:
            log.info("best dev F1 %.4f at epoch %d; model in %s", progress.best_f1, progress.best_epoch,
                     self.model_dir)
        return summary

    def _train_epoch(self, epoch: int, live: Any) -> None:
        config, progress = self.config, self.progress
        self.model.train()
        if progress.batches is None:  # a new epoch (None after each epoch, and unless resumed mid-epoch)
            progress.batches = bucket_batches(self.data.train_ex, config.batch_size, self.rng)
            progress.total_loss, progress.seen = 0.0, 0
        batches = progress.batches
        first, progress.batch = progress.batch, 0  # only the resumed epoch starts part-way
        self._new_step()
        bar = tqdm(range(first, len(batches)), desc=f"epoch {epoch + 1}/{config.epochs}", mininterval=2.0,
                   leave=False, disable=not self.world.is_main)
        for i in bar:
            loss_sum, weight, finite = self._accumulate(batches[i])
            last = i + 1 == len(batches)
            if (i + 1) % config.grad_accumulation and not last:
                continue
            if not self._optimizer_step(finite, epoch):
                continue
            step_loss = self.world.sum(loss_sum.item() if weight else 0.0) / len(batches[i])
            self._log_step(live, step_loss)
            if config.checkpoint_every and progress.step % config.checkpoint_every == 0 and not last:
                self._save_checkpoint(epoch, i + 1)
            bar.set_postfix(loss=f"{step_loss:.3f}")

    def _accumulate(self, batch_ids: list[int]) -> tuple[torch.Tensor, float, bool]:
        """Forward and backward of this rank's share of one batch; returns its summed loss, weight, finiteness."""
        mine, weight = self.world.shard(batch_ids)
        # weight makes the ranks' gradients, averaged by DDP, the gradient of the global batch mean
        loss_sum = self._fit_in_memory(mine, weight / self.config.grad_accumulation)
        finite = bool(torch.isfinite(loss_sum))
        if finite and weight:
            self.progress.total_loss += loss_sum.item()
            self.progress.seen += len(mine)
        return loss_sum, weight, finite

    def _batch(self, ids: list[int]) -> dict[str, torch.Tensor]:
        """Training examples padded into one batch on the device."""
        examples = [self.data.train_ex[j] for j in ids]
        return {k: v.to(self.device) for k, v in collate(examples, self.data.specials.pad).items()}

    def _forward_backward(self, ids: list[int], scale: float) -> torch.Tensor:
        """The summed loss of some examples, its gradient (times ``scale``) added to the step's."""
        batch = self._batch(ids)
        with self.autocast:
            loss_sum = self.objective(**batch)
        self.grads_dirty = True  # until backward returns: a failure in it may leave part of a gradient behind
        self.scaler.scale(loss_sum * scale).backward()
        self.grads_dirty = False
        return loss_sum

    def _fit_in_memory(self, ids: list[int], scale: float) -> torch.Tensor:
        """Forward and backward, in halves when the device runs out of memory (see :meth:`_split`)."""
        try:
            loss_sum = self._forward_backward(ids, scale)
        except torch.cuda.OutOfMemoryError:
            pass  # retried below, outside the handler: its traceback holds the failed attempt's activations
        else:
            self.step_pieces.append((ids, scale))
            return loss_sum
        return self._split(ids, scale)

    def _split(self, ids: list[int], scale: float) -> torch.Tensor:
        """Out of memory: run the examples as two halves with the same loss scale.

        The loss is a sum over examples times one scale (the batch's weight / grad_accumulation), so the
        halves' gradients add up to the unsplit one: effective batch, loss scale and schedule stay the same.
        Halves that still do not fit are split again, down to one example.
        """
        if len(ids) == 1 or self.world.size > 1:
            raise self._out_of_memory(ids) from None
        if len(ids) not in self.oom_sizes:
            self.oom_sizes.add(len(ids))
            log.warning("out of memory at batch size %d: splitting it in two (same gradient)", len(ids))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.grads_dirty:
            self._replay_pieces()
        half = (len(ids) + 1) // 2
        first = self._fit_in_memory(ids[:half], scale)
        return first.detach() + self._fit_in_memory(ids[half:], scale).detach()

    def _replay_pieces(self) -> None:
        """A backward that ran out of memory may have added part of its gradient: rebuild the step's gradient
        from the pieces that fitted (zeroed, then their forward and backward again)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.grads_dirty = False
        for ids, scale in self.step_pieces:
            try:
                self._forward_backward(ids, scale)
            except torch.cuda.OutOfMemoryError:
                raise self._out_of_memory(ids) from None

    def _out_of_memory(self, ids: list[int]) -> OutOfDeviceMemory:
        """The typed error when splitting cannot help: one example, or ranks that must stay in step."""
        if self.world.size > 1:
            return OutOfDeviceMemory(
                f"out of memory on {self.device} at batch size {len(ids)} (rank {self.world.rank}): under "
                "torchrun a batch is not split (the ranks' gradient exchange must stay in step); lower "
                "train.batch_size and raise train.grad_accumulation to keep the effective batch")
        words = max(len(self.data.train_ex[j].input_ids) for j in ids)
        return OutOfDeviceMemory(
            f"out of memory on {self.device} with {len(ids)} example(s) of up to {words} sub-tokens, after "
            f"splitting the batch down to that; lower train.max_length (now {self.config.max_length}) or use "
            "a device with more memory")

    def _new_step(self) -> None:
        """An empty gradient for the next optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.step_pieces.clear()

    def _optimizer_step(self, loss_finite: bool, epoch: int) -> bool:
        """Clip and step; a non-finite gradient drops the step instead (and stops a run that keeps diverging).

        The norm is taken before clipping (what ``clip_grad_norm_`` does in one call): clipping by a NaN norm
        would make every gradient NaN and hide which one went bad first.
        """
        optimizer, scaler = self.optimizer, self.scaler
        scaler.unscale_(optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if not torch.isfinite(norm):
            self._skip_step(loss_finite, epoch)
            return False
        torch.nn.utils.clip_grads_with_norm_(params, self.config.grad_clip, norm)
        self.bad_in_a_row = 0
        scaler.step(optimizer)
        scaler.update()
        self.scheduler.step()
        self._new_step()
        self.progress.step += 1
        return True

    def _skip_step(self, loss_finite: bool, epoch: int) -> None:
        """A NaN/inf step would poison the weights: drop it, and stop if it keeps happening."""
        overflow = self.scaler.is_enabled() and loss_finite  # an fp16 overflow: the scaler's business
        origin = None if overflow else self._nan_origin()  # while the bad gradients are still there
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # sees the inf and skips; update() then lowers the scale
            self.scaler.update()
        self._new_step()
        self.skipped += 1
        if origin is None:
            return
        self.bad_in_a_row += 1
        log.warning("skipped an optimizer step: %s is not finite (%d in a row); origin: %s",
                    "loss" if not loss_finite else "gradient norm", self.bad_in_a_row, origin)
        if self.bad_in_a_row >= self.config.max_bad_steps:
            raise TrainingDiverged(
                f"loss or gradients were not finite for {self.bad_in_a_row} optimizer steps in a row "
                f"(epoch {epoch + 1}; last one: {origin}); lower the learning rates (train.lr_*) or check "
                "the data")

    def _nan_origin(self) -> Origin:
        """Which weight, module output or gradient went non-finite first in this step (rare: costs a forward).

        The step's pieces are run forward again under hooks, with the RNG forked so that dropout masks and
        every later step are exactly what they would have been without the diagnosis.
        """
        model = self.model
        plain = Objective(model)  # not the DDP wrapper: a no-grad forward needs no gradient exchange

        def rerun() -> None:
            for ids, _ in self.step_pieces:
                batch = self._batch(ids)
                with self.autocast:
                    plain(**batch)

        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return trace_origin(model, rerun)

    def _log_step(self, live: Any, step_loss: float) -> None:
        live.log_metric("train/loss", step_loss)
        for name, g in self.lr_series:
            live.log_metric(f"train/lr/{name}", self.optimizer.param_groups[g]["lr"])
        live.next_step()

    def _end_epoch(self, epoch: int, live: Any) -> bool:
        """Dev F1, the best model so far, the plateau schedule and early stopping; True: stop."""
        progress, world = self.progress, self.world
        dev = self._dev_scores() if world.is_main else None
        dev = world.from_main(dev)
        train_loss = world.sum(progress.total_loss) / max(world.sum(progress.seen), 1)
        self.scheduler.epoch_end(dev["f1"])
        for key in ("f1", "precision", "recall"):
            live.log_metric(f"dev/{key}", dev[key])
        live.log_metric("train/epoch_loss", train_loss)
        progress.history.append({"epoch": epoch + 1, "train_loss": train_loss, "dev_f1": dev["f1"]})
        log.info("epoch %d: train loss %.4f, dev F1 %.4f", epoch + 1, train_loss, dev["f1"])
        stop = False
        if dev["f1"] > progress.best_f1:
            progress.best_f1, progress.best_epoch, progress.stale = dev["f1"], epoch + 1, 0
            if world.is_main:
                save_best(self.model, self.data.labels, self.data.hf_tokenizer, self.model_dir)
        else:
            progress.stale += 1
            if progress.stale >= self.config.patience:
                log.info("early stop: dev F1 has not improved for %d epochs", progress.stale)
                stop = True
        progress.batches = None
        self._save_checkpoint(epoch + 1, 0, completed=stop or epoch + 1 == self.config.epochs)
        return stop

    def _dev_scores(self) -> dict[str, Any]:
        data = self.data
        pred = predict_tags(self.model, data.dev_ex, len(data.dev_sents), data.labels["tags"], data.specials.pad,
                            self.config.eval_batch_size, self.device)
        return score([s.tags for s in data.dev_sents], pred, data.labels["scheme"])


def save_best(model: BertBiLstmCrf, labels: dict, hf_tokenizer: Any, model_dir: str | Path) -> None:
    """Swap in a complete model folder, so a crash never leaves half a model."""
    with atomic_dir(model_dir) as tmp:
        save_model(model, tmp, labels)
        hf_tokenizer.save_pretrained(str(tmp))
