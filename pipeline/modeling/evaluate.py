"""Tag sentences with the PyTorch model (windows as the runtime plans them) and score them.

``train`` uses the same decoding and ``pipeline.core.metrics.score`` for the dev F1 that picks the best
epoch, so the number that selects a model and the number reported for it are computed the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.core.conll import Sentence
from pipeline.core.encoding import load_tokenizer
from pipeline.core.metrics import score
from pipeline.modeling.data import Example, collate, make_examples
from pipeline.modeling.model import BertBiLstmCrf, load_model

log = logging.getLogger(__name__)


@torch.inference_mode()
def predict_tags(model: BertBiLstmCrf, examples: Sequence[Example], n_sentences: int, tags: list[str],
                 pad_id: int, batch_size: int = 64, device: str | torch.device = "cpu") -> list[list[str]]:
    """Decode examples with the model's CRF; each window gives the words it owns, in order."""
    model.eval()
    out: list[list[str]] = [[] for _ in range(n_sentences)]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    decoded: dict[int, list[int]] = {}
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        emissions = model(batch["input_ids"], batch["attention_mask"], batch["word_index"], batch["word_mask"])
        for i, path in zip(idx, model.decode(emissions, batch["word_mask"])):
            decoded[i] = path
    for i, example in enumerate(examples):
        owned = decoded[i][example.own_lo:example.own_hi]
        out[example.sentence_index].extend(tags[t] for t in owned)
    return out


def predict_sentences(model_dir: str | Path, sentences: list[Sentence], batch_size: int = 64) -> tuple[list, dict]:
    """Tags the saved PyTorch model gives each sentence, and the model's labels."""
    model, labels = load_model(model_dir)
    tokenizer, specials = load_tokenizer(model_dir)
    tag_to_id = {t: i for i, t in enumerate(labels["tags"])}
    examples = make_examples(sentences, tokenizer, specials, tag_to_id, model.head_config.max_length,
                             model.head_config.window_overlap, scheme=labels["scheme"])
    return predict_tags(model, examples, len(sentences), labels["tags"], specials.pad, batch_size), labels


def evaluate(model_dir: str | Path, sentences: list[Sentence], batch_size: int = 64) -> dict[str, Any]:
    pred, labels = predict_sentences(model_dir, sentences, batch_size)
    return score([s.tags for s in sentences], pred, labels["scheme"])
