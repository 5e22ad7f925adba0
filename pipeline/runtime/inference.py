"""The one inference runtime: text -> entities with character offsets and scores.

Used by ``predict``, ``serve/`` and the benchmarks. Needs onnxruntime,
tokenizers and numpy; never torch. Steps: split words (same splitter as
training), encode, window long texts, run the ONNX emission graph on
length-sorted dynamic batches, Viterbi-decode in numpy, turn tags into spans
with exact character offsets, score them with CRF marginals.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from pipeline.core.cpu import cpu_info, describe
from pipeline.core.encoding import (
    DEFAULT_WINDOW_OVERLAP,
    Window,
    load_tokenizer,
    plan_windows,
    texts_word_pieces,
    window_inputs,
)
from pipeline.core.errors import ModelLoadError
from pipeline.core.tags import tags_to_spans
from pipeline.core.words import split_words
from pipeline.runtime.uncertainty import UNCERTAINTIES, confidences, word_entropies
from pipeline.runtime.viterbi import CrfParams, marginals, viterbi_decode

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
QUANTIZED_FILE = "model.int8.onnx"
#: The int8 graph for CPUs without VNNI (AVX2 only, e.g. Zen 3): ONNX Runtime's u8s8 kernels saturate there
#: (``vpmaddubsw``), so its weights are 7-bit (``reduce_range``) and it has no block-wise MatMuls (slower than fp32
#: there). :func:`int8_file` picks one of the two by the CPU the runtime runs on.
QUANTIZED_AVX2_FILE = "model.int8-avx2.onnx"
CRF_FILE = "crf.json"
INFO_FILE = "model_info.json"
# Export saves both graphs optimized at this level (portable: no hardware-specific layouts), and the runtime
# loads such files with optimizations off, so nothing is rebuilt at load and the served graph is the one
# export checked. Folders exported before this (no ``graph_optimized`` in model_info.json) are optimized at load.
OPTIMIZED_LEVEL = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
# Sub-tokens (windows x the longest) per ONNX run at most: what bounds the encoder's activations, its attention
# scores above all (heads x tokens^2 a window). Tweets fill runs of 32 windows within it; 512-token windows go 8 to a
# run. 8 long texts (538k characters) in runs of 32 such windows peaked at 1,311 MB RSS (int8, AMD EPYC Zen 4), in
# runs of 8 at 493 MB, at the same speed (29.6 vs 28.9 s).
RUN_TOKENS = 4096
# Viterbi and marginals run in numpy with one Python step per word, over batches of texts of similar length: the
# more texts a step covers, the less its overhead weighs (2,000 tweets: 87 ms of decoding in batches of 32, 60 ms
# in batches of 128 on an AMD EPYC Zen 4). ``DECODE_CELLS`` (texts x words) bounds a batch's float64 forward and
# backward tables (~0.5 kB a cell), so long texts go in small batches.
DECODE_ROWS = 128
DECODE_CELLS = 16_384


def session_options(threads: int = 0, optimized: bool = False, spin_after_call: bool = False) -> ort.SessionOptions:
    """CPU session options: ``threads`` intra-op threads (0: one per physical core), sequential graph, and no
    spinning between calls unless ``spin_after_call``.

    ONNX Runtime's pool threads spin-wait inside a call (fast hand-offs between kernels) and, by default, for a
    while after it. ``session.force_spinning_stop`` ends that spin when the last concurrent call returns, so an
    idle runtime burns no CPU and, in the service, the event loop and the batcher get the cores between calls:
    on 2 cores (AMD EPYC, AVX2) it cut the batcher + ONNX Runtime CPU per answered request by ~20% and raised
    32-client throughput, while batched calls kept their speed. Threads that keep spinning stay ready for the
    next call instead: one-tweet requests beside a long request's windows kept a shorter tail that way
    (``spin_after_call``; README, "Serving")."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.force_spinning_stop", "0" if spin_after_call else "1")
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads > 0:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return options


def int8_file(model_dir: Path, vnni: bool) -> str:
    """The int8 graph for a CPU with (``vnni``) or without VNNI: ``model.int8-avx2.onnx`` where the folder has one
    and the CPU lacks VNNI, ``model.int8.onnx`` otherwise (folders exported before there were two)."""
    if not vnni and (model_dir / QUANTIZED_AVX2_FILE).is_file():
        return QUANTIZED_AVX2_FILE
    return QUANTIZED_FILE


def length_batches(order: list[int], lengths: list[int], rows: int, cells: int) -> list[list[int]]:
    """``order`` (items sorted by ``lengths``) cut into padded batches: up to ``rows`` items and ``cells`` (items x
    the longest) each, one item at least (a long one alone). ONNX runs (windows, sub-tokens) and decoding batches
    (texts, words)."""
    batches: list[list[int]] = []
    for i, n in zip(order, lengths):
        if batches and len(batches[-1]) < rows and (len(batches[-1]) + 1) * n <= cells:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@dataclass(frozen=True)
class Entity:
    start: int
    end: int
    text: str
    label: str
    score: float


@dataclass(frozen=True)
class TextPrediction:
    entities: list[Entity]
    score: float  # probability of the whole decoded tag sequence: low means "look at this task first"
    confidence: dict[str, float] = field(default_factory=lambda: dict.fromkeys(UNCERTAINTIES, 1.0))
    """The three confidences of ``pipeline.runtime.uncertainty`` (``sequence`` equals ``score``)."""

    def to_dict(self) -> dict[str, Any]:
        return {"entities": [asdict(e) for e in self.entities], "score": self.score,
                "confidence": dict(self.confidence)}


@dataclass
class EncodedWindow:
    """One encoder window of one text, waiting for its batch."""

    text_index: int
    window: Window
    input_ids: list[int]
    word_index: list[int]


@dataclass(frozen=True)
class ModelCard:
    """What an exported model folder says about itself, read without loading the graph (a Ray driver that only
    hands the folder to its workers needs no session of its own)."""

    onnx_path: Path
    info: dict[str, Any]
    model_version: str
    entity_types: list[str]

    @classmethod
    def read(cls, model_dir: str | Path, quantized: bool = False, onnx_file: str | None = None) -> ModelCard:
        """The folder's card; ``quantized``: the int8 graph for this CPU (:func:`int8_file`); ``onnx_file``: that
        graph of the folder instead (the export checks each int8 graph on whatever CPU it runs on)."""
        model_dir = Path(model_dir)
        if onnx_file is None:
            onnx_file = int8_file(model_dir, bool(cpu_info()["vnni"])) if quantized else MODEL_FILE
        onnx_path = model_dir / onnx_file
        for path in (onnx_path, model_dir / CRF_FILE, model_dir / INFO_FILE):
            if not path.is_file():
                raise ModelLoadError(f"{path} not found; run the export stage first")
        info = json.loads((model_dir / INFO_FILE).read_text())
        suffix = {MODEL_FILE: "", QUANTIZED_FILE: "-int8", QUANTIZED_AVX2_FILE: "-int8-avx2"}.get(
            onnx_file, f"-{onnx_path.stem}")
        return cls(onnx_path, info, info["model_version"] + suffix, info["entity_types"])


class NerRuntime:
    """An exported model folder loaded for inference."""

    def __init__(self, model_dir: str | Path, *, quantized: bool = False, threads: int = 0,
                 max_tokens: int = 512, batch_size: int = 32, onnx_file: str | None = None,
                 spin_after_call: bool = False, run_tokens: int = RUN_TOKENS) -> None:
        self.model_dir = Path(model_dir)
        card = ModelCard.read(self.model_dir, quantized, onnx_file)
        onnx_path = card.onnx_path
        crf = json.loads((self.model_dir / CRF_FILE).read_text())
        self.crf = CrfParams.from_dict(crf)
        self.tags: list[str] = crf["tags"]
        self._outside = self.tags.index("O") if "O" in self.tags else None
        self.info: dict[str, Any] = card.info
        self.entity_types: list[str] = card.entity_types
        self.model_version: str = card.model_version
        self.tokenizer, self.specials = load_tokenizer(self.model_dir)
        self.max_tokens = min(max_tokens, int(self.info.get("max_length", 512))) - 2
        self.window_overlap = float(self.info.get("window_overlap", DEFAULT_WINDOW_OVERLAP))  # as trained
        self.batch_size = batch_size  # windows per ONNX run, at most
        self.run_tokens = run_tokens    # and sub-tokens (windows x the longest) per run, at most: RUN_TOKENS
        self.onnx_path = onnx_path
        options = session_options(threads, optimized=bool(self.info.get("graph_optimized")),
                                  spin_after_call=spin_after_call)
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        if quantized and onnx_file is None:
            self._say_which_int8()

    def _say_which_int8(self) -> None:
        if self.onnx_path.name == QUANTIZED_FILE and not cpu_info()["vnni"]:
            log.warning("%s on a CPU without VNNI (%s), and no %s beside it (exported before there was one): "
                        "ONNX Runtime's u8s8 kernels saturate here, so expect ~1.1x fp32 speed and 4x the "
                        "emission error of VNNI CPUs; export again to get the graph for this CPU", QUANTIZED_FILE,
                        describe(), QUANTIZED_AVX2_FILE)
        else:
            log.info("int8 graph %s for this CPU, %s", self.onnx_path.name, describe())

    def predict(self, texts: list[str]) -> list[TextPrediction]:
        """Entities for each text, in input order."""
        return self.predict_words(texts, [split_words(t) for t in texts])

    def predict_words(self, texts: list[str], words: list[list[tuple[int, int]]]) -> list[TextPrediction]:
        """Entities for texts already cut into words: ``words[i]`` are (start, end) offsets into ``texts[i]``
        (a CoNLL ``Sentence``'s ``text`` and ``words``)."""
        return self.decode(texts, words, self.word_emissions([[t[s:e] for s, e in w] for t, w in zip(texts, words)]))

    def decode(self, texts: list[str], words: list[list[tuple[int, int]]],
               emissions: list[np.ndarray]) -> list[TextPrediction]:
        """Predictions from each text's per-word emissions (``word_emissions``), decoded in numpy batches."""
        out: list[TextPrediction | None] = [TextPrediction([], 1.0) if not w else None for w in words]
        for idx, paths, best, probs, log_z in self._decode_batches(emissions):
            entropies = word_entropies(probs)
            for row, i in enumerate(idx):
                out[i] = self._prediction(texts[i], words[i], paths[row], float(best[row]), probs[row],
                                          float(log_z[row]), entropies[row])
        return out  # type: ignore[return-value]

    def tag_words(self, words: list[list[str]]) -> list[list[str]]:
        """Tags for texts already cut into words (evaluation on CoNLL files)."""
        return self.decode_tags(self.word_emissions(words))

    def decode_tags(self, emissions: list[np.ndarray]) -> list[list[str]]:
        """Viterbi tags of ``word_emissions`` output, for callers that also need the emissions."""
        out: list[list[str]] = [[] for _ in emissions]
        for idx, paths, *_ in self._decode_batches(emissions, with_marginals=False):
            for row, i in enumerate(idx):
                out[i] = [self.tags[t] for t in paths[row]]
        return out

    def _decode_batches(self, emissions: list[np.ndarray], with_marginals: bool = True):
        """Viterbi (and marginals) over length-sorted, padded batches: numpy per batch, not per text."""
        order = sorted((i for i, em in enumerate(emissions) if len(em)), key=lambda i: len(emissions[i]))
        for idx in length_batches(order, [len(emissions[i]) for i in order], DECODE_ROWS, DECODE_CELLS):
            width = len(emissions[idx[-1]])
            em = np.zeros((len(idx), width, len(self.tags)), dtype=np.float32)
            mask = np.zeros((len(idx), width), dtype=bool)
            for row, i in enumerate(idx):
                em[row, :len(emissions[i])] = emissions[i]
                mask[row, :len(emissions[i])] = True
            paths, best = viterbi_decode(em, mask, self.crf)
            probs, log_z = marginals(em, mask, self.crf) if with_marginals else (None, None)
            yield idx, paths, best, probs, log_z

    def word_emissions(self, words: list[list[str]]) -> list[np.ndarray]:
        """Per-word emissions; long texts are windowed, each word read where it is most central."""
        jobs = self.encode(words)
        emissions = [np.zeros((len(ws), len(self.tags)), dtype=np.float32) for ws in words]
        for job, em in zip(jobs, self.run_windows(jobs)):
            w = job.window
            emissions[job.text_index][w.own_lo:w.own_hi] = em[w.own_lo - w.lo:w.own_hi - w.lo]
        return emissions

    def run_windows(self, windows: list[EncodedWindow]) -> list[np.ndarray]:
        """Each window's emissions, in input order: ONNX runs of windows sorted by length, at most ``batch_size``
        windows and ``run_tokens`` sub-tokens (windows x the longest) each."""
        order = sorted(range(len(windows)), key=lambda j: len(windows[j].input_ids))
        out: list[np.ndarray] = [np.empty(0)] * len(windows)
        for run in length_batches(order, [len(windows[j].input_ids) for j in order], self.batch_size,
                                  self.run_tokens):
            for j, em in zip(run, self._run([windows[j] for j in run])):
                out[j] = em
        return out

    def encode(self, words: list[list[str]]) -> list[EncodedWindow]:
        """The encoder windows of each text: ``[CLS] sub-tokens [SEP]``, at most ``max_tokens`` long."""
        jobs: list[EncodedWindow] = []
        for i, pieces in enumerate(texts_word_pieces(self.tokenizer, self.specials, words, self.max_tokens)):
            for window in plan_windows([len(p) for p in pieces], self.max_tokens, self.window_overlap):
                ids, first = window_inputs(pieces, window, self.specials)
                jobs.append(EncodedWindow(i, window, ids, first))
        return jobs

    def emissions(self, input_ids: np.ndarray, attention_mask: np.ndarray, word_index: np.ndarray,
                  word_mask: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask,
                                       "word_index": word_index, "word_mask": word_mask})[0]

    def _run(self, batch: list[EncodedWindow]) -> list[np.ndarray]:
        seq = max(len(p.input_ids) for p in batch)
        n_words = max(len(p.word_index) for p in batch)
        input_ids = np.full((len(batch), seq), self.specials.pad, dtype=np.int64)
        attention = np.zeros((len(batch), seq), dtype=np.int64)
        word_index = np.zeros((len(batch), n_words), dtype=np.int64)
        word_mask = np.zeros((len(batch), n_words), dtype=np.int64)
        for i, p in enumerate(batch):
            input_ids[i, :len(p.input_ids)] = p.input_ids
            attention[i, :len(p.input_ids)] = 1
            word_index[i, :len(p.word_index)] = p.word_index
            word_mask[i, :len(p.word_index)] = 1
        out = self.emissions(input_ids, attention, word_index, word_mask)
        return [out[i, :len(p.word_index)] for i, p in enumerate(batch)]

    def _prediction(self, text: str, words: list[tuple[int, int]], path: list[int], best: float,
                    probs: np.ndarray, log_z: float, entropies: np.ndarray | None = None) -> TextPrediction:
        tags = [self.tags[t] for t in path]
        path_probs = probs[np.arange(len(path)), path].tolist()  # each word's marginal of its decoded tag
        entities, entity_scores = [], []
        for first, last, label in tags_to_spans(tags):
            start, end = words[first][0], words[last - 1][1]
            score = sum(path_probs[first:last]) / (last - first)
            entity_scores.append(score)
            entities.append(Entity(start, end, text[start:end], label, round(score, 6)))
        sequence_prob = float(np.exp(min(0.0, best - log_z)))
        confidence = confidences(path, probs[:len(path)], sequence_prob, entity_scores, self._outside, entropies)
        return TextPrediction(entities, round(sequence_prob, 6), confidence)
