"""The tagger a user who skips our product would build: ``BertForTokenClassification`` in plain ONNX Runtime.

The same encoder folder, exported the usual way (``torch.onnx.export``, opset 17, dynamic batch and length, no
graph fusion), optionally ``quantize_dynamic`` to int8; texts tokenized by the fast tokenizer with offsets,
sorted by length into batches, argmax per sub-token, entities from runs of the same non-O label (first
sub-token of each word decides, as the HF "first" aggregation). No BiLSTM, no CRF: the peer our runtime must
match in speed although it does more. Its head is random (speed only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoTokenizer, BertForTokenClassification


def export_plain(encoder: str, tags: list[str], folder: Path, quantize: bool) -> Path:
    """``model.onnx`` (and ``model.int8.onnx`` if ``quantize``) of a token-classification BERT in ``folder``."""
    model = BertForTokenClassification.from_pretrained(encoder, num_labels=len(tags), attn_implementation="eager")
    model.eval()
    dummy = (torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    path = folder / "model.onnx"
    axes = {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
            "logits": {0: "batch", 1: "length"}}
    with torch.inference_mode():
        torch.onnx.export(model, dummy, str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], dynamic_axes=axes, opset_version=17, dynamo=False)
    if not quantize:
        return path
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8 = folder / "model.int8.onnx"
    quantize_dynamic(str(path), str(int8), weight_type=QuantType.QInt8)
    return int8


class PlainTagger:
    """Text in, ``(start, end, label)`` entities out, in sorted batches of ``batch_size``."""

    def __init__(self, onnx_path: Path, encoder: str, tags: list[str], threads: int, batch_size: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.tokenizer = AutoTokenizer.from_pretrained(encoder)
        self.tags, self.batch_size = tags, batch_size

    def predict(self, texts: list[str]) -> list[list[tuple[int, int, str]]]:
        enc = self.tokenizer(texts, truncation=True, max_length=512, return_offsets_mapping=True)
        order = sorted(range(len(texts)), key=lambda i: len(enc["input_ids"][i]))
        out: list[Any] = [None] * len(texts)
        for lo in range(0, len(order), self.batch_size):
            rows = order[lo:lo + self.batch_size]
            width = max(len(enc["input_ids"][i]) for i in rows)
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                n = len(enc["input_ids"][i])
                ids[r, :n], mask[r, :n] = enc["input_ids"][i], 1
            labels = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0].argmax(-1)
            for r, i in enumerate(rows):
                out[i] = self._entities(enc[i].word_ids, enc["offset_mapping"][i], labels[r])
        return out

    def _entities(self, word_ids: list[int | None], offsets: list[tuple[int, int]],
                  labels: np.ndarray) -> list[tuple[int, int, str]]:
        entities: list[tuple[int, int, str]] = []
        previous_word, current = None, None
        for k, word in enumerate(word_ids):
            if word is None:
                continue
            if word == previous_word:  # a later sub-token widens the word
                if current is not None:
                    current[1] = offsets[k][1]
                continue
            previous_word = word
            tag = self.tags[int(labels[k])]
            kind = tag[2:] if tag != "O" else None
            if current is not None and (kind is None or tag.startswith("B-") or kind != current[2]):
                entities.append(tuple(current))  # type: ignore[arg-type]
                current = None
            if kind is not None and current is None:
                current = [offsets[k][0], offsets[k][1], kind]
            elif kind is not None:
                current[1] = offsets[k][1]
        if current is not None:
            entities.append(tuple(current))  # type: ignore[arg-type]
        return entities
