"""Score a trained model on the test split with seqeval, per entity type.

Also used by ``train`` for the dev score that picks the best epoch, so the
number that selects a model and the number reported for it are computed the
same way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from seqeval.metrics import classification_report
from seqeval.scheme import IOB2, IOBES

from pipeline.atomic import write_json
from pipeline.conll import Sentence, read_conll
from pipeline.data import Example, collate, make_examples
from pipeline.encoding import load_tokenizer
from pipeline.model import BertBiLstmCrf, load_model

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


def score(gold: list[list[str]], pred: list[list[str]], scheme: str) -> dict[str, Any]:
    """Micro/macro precision, recall, F1 and per-type figures (lenient and strict)."""
    lenient = classification_report(gold, pred, output_dict=True, zero_division=0)
    strict = classification_report(gold, pred, output_dict=True, zero_division=0, mode="strict",
                                   scheme=IOBES if scheme == "BIOES" else IOB2)
    per_type = {k: {"precision": v["precision"], "recall": v["recall"], "f1": v["f1-score"],
                    "support": int(v["support"])}
                for k, v in lenient.items() if not k.endswith(" avg")}
    micro = lenient.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    return {
        "precision": micro["precision"],
        "recall": micro["recall"],
        "f1": micro["f1-score"],
        "macro_f1": lenient.get("macro avg", {}).get("f1-score", 0.0),
        "strict_f1": strict.get("micro avg", {}).get("f1-score", 0.0),
        "sentences": len(gold),
        "per_type": per_type,
    }


def evaluate(model_dir: str | Path, sentences: list[Sentence], batch_size: int = 64) -> dict[str, Any]:
    model, labels = load_model(model_dir)
    tokenizer, specials = load_tokenizer(model_dir)
    tag_to_id = {t: i for i, t in enumerate(labels["tags"])}
    examples = make_examples(sentences, tokenizer, specials, tag_to_id, model.head_config.max_length,
                             scheme=labels["scheme"])
    pred = predict_tags(model, examples, len(sentences), labels["tags"], specials.pad, batch_size)
    return score([s.tags for s in sentences], pred, labels["scheme"])


def main(params: dict[str, Any]) -> None:
    paths, conf = params["paths"], params["evaluate"]
    sentences = list(read_conll(Path(paths["conll_dir"]) / "test.conll"))
    metrics = evaluate(paths["model_dir"], sentences, conf["batch_size"])
    write_json(paths["eval_metrics"], {"test": metrics})
    rows = [{"type": k, "f1": round(v["f1"], 4), "support": v["support"]} for k, v in metrics["per_type"].items()]
    write_json(paths["eval_per_type_plot"], rows)
    log.info("test F1 %.4f (strict %.4f, P %.4f, R %.4f) on %d sentences", metrics["f1"], metrics["strict_f1"],
             metrics["precision"], metrics["recall"], metrics["sentences"])
