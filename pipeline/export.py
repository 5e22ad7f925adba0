"""Export the emission graph to ONNX, quantize it, and prove both against PyTorch.

The ONNX graph holds encoder + BiLSTM + linear with the first-sub-token
gather; the CRF (transitions, start/end scores, tag names) goes beside it in
``crf.json`` and is decoded in numpy. The export fails, leaving the previous
folder in place, if emissions or decoded tags differ from PyTorch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from pipeline.atomic import atomic_dir, write_json
from pipeline.conll import Sentence, read_conll
from pipeline.data import collate, make_examples
from pipeline.encoding import load_tokenizer
from pipeline.errors import PipelineError
from pipeline.evaluate import score
from pipeline.inference import CRF_FILE, INFO_FILE, MODEL_FILE, QUANTIZED_FILE, NerRuntime
from pipeline.model import LABELS, BertBiLstmCrf, load_model
from pipeline.viterbi import CrfParams, viterbi_decode

log = logging.getLogger(__name__)

INPUTS = ["input_ids", "attention_mask", "word_index", "word_mask"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


class ExportError(PipelineError):
    """The exported graph does not reproduce the PyTorch model."""


def export_onnx(model: BertBiLstmCrf, path: Path, opset: int) -> None:
    model.eval()
    dummy = (torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]]),
             torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
             torch.tensor([[1, 2], [1, 0]]),
             torch.tensor([[1, 1], [1, 0]]))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "word_index": {0: "batch", 1: "words"}, "word_mask": {0: "batch", 1: "words"},
            "emissions": {0: "batch", 1: "words"}}
    with torch.inference_mode():
        torch.onnx.export(model, dummy, str(path), input_names=INPUTS, output_names=["emissions"],
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    onnx.checker.check_model(str(path))


def crf_dict(model: BertBiLstmCrf, tags: list[str]) -> dict[str, Any]:
    return {
        "tags": tags,
        "start_transitions": model.crf.start_transitions.detach().cpu().tolist(),
        "end_transitions": model.crf.end_transitions.detach().cpu().tolist(),
        "transitions": model.crf.transitions.detach().cpu().tolist(),
    }


def check_parity(model: BertBiLstmCrf, runtime: NerRuntime, sentences: list[Sentence], model_dir: Path,
                 batch_size: int = 32) -> dict[str, Any]:
    """Max |emission difference| and identical Viterbi vs torchcrf paths on ``sentences``."""
    tokenizer, specials = load_tokenizer(model_dir)
    tag_to_id = {t: i for i, t in enumerate(runtime.tags)}
    examples = make_examples(sentences, tokenizer, specials, tag_to_id, model.head_config.max_length)
    max_diff, mismatched = 0.0, 0
    with torch.inference_mode():
        for lo in range(0, len(examples), batch_size):
            batch = collate(examples[lo:lo + batch_size], specials.pad)
            torch_em = model(batch["input_ids"], batch["attention_mask"], batch["word_index"], batch["word_mask"])
            ort_em = runtime.emissions(*(batch[k].numpy() for k in INPUTS))
            mask = batch["word_mask"].numpy()
            diff = np.abs(torch_em.numpy() - ort_em)[mask.astype(bool)]
            max_diff = max(max_diff, float(diff.max()) if diff.size else 0.0)
            torch_paths = model.decode(torch_em, batch["word_mask"])
            ort_paths, _ = viterbi_decode(ort_em, mask, runtime.crf)
            mismatched += sum(a != b for a, b in zip(torch_paths, ort_paths))
    return {"max_abs_diff": max_diff, "sequences": len(examples), "mismatched_sequences": mismatched}


def runtime_f1(runtime: NerRuntime, sentences: list[Sentence], scheme: str) -> float:
    pred = runtime.tag_words([s.tokens for s in sentences])
    return score([s.tags for s in sentences], pred, scheme)["f1"]


def export(model_dir: str | Path, onnx_dir: str | Path, conll_dir: str | Path, metrics_path: str | Path, *,
           opset: int = 17, quantize: bool = True, max_abs_diff: float = 1e-4) -> dict[str, Any]:
    model_dir, conll_dir = Path(model_dir), Path(conll_dir)
    model, labels = load_model(model_dir)
    dev = list(read_conll(conll_dir / "dev.conll"))
    test = list(read_conll(conll_dir / "test.conll"))
    metrics: dict[str, Any] = {}
    with atomic_dir(onnx_dir) as out:
        export_onnx(model, out / MODEL_FILE, opset)
        (out / CRF_FILE).write_text(json.dumps(crf_dict(model, labels["tags"])) + "\n")
        (out / LABELS).write_text(json.dumps(labels, indent=2, ensure_ascii=False) + "\n")
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, out / name)
        digest = hashlib.sha256((out / MODEL_FILE).read_bytes()).hexdigest()[:12]
        info = {"model_version": f"bert-bilstm-crf-{digest}", "entity_types": labels["entity_types"],
                "scheme": labels["scheme"], "max_length": model.head_config.max_length,
                "encoder_layers": model.bert.config.num_hidden_layers, "hidden_size": model.bert.config.hidden_size}
        write_json(out / INFO_FILE, info)

        runtime = NerRuntime(out)
        parity = check_parity(model, runtime, dev, out)
        metrics["parity"] = parity
        log.info("parity on %d dev sequences: max |diff| %.2e, %d decoded paths differ", parity["sequences"],
                 parity["max_abs_diff"], parity["mismatched_sequences"])
        if parity["max_abs_diff"] > max_abs_diff or parity["mismatched_sequences"]:
            raise ExportError(f"ONNX does not reproduce PyTorch: max |emission diff| {parity['max_abs_diff']:.2e} "
                              f"(tolerance {max_abs_diff:.0e}), {parity['mismatched_sequences']} dev sequences "
                              "decode differently")
        metrics["test_f1_fp32"] = runtime_f1(runtime, test, labels["scheme"])
        metrics["onnx_mb"] = round((out / MODEL_FILE).stat().st_size / 2**20, 2)
        if quantize:
            quantize_dynamic(str(out / MODEL_FILE), str(out / QUANTIZED_FILE), weight_type=QuantType.QInt8,
                             per_channel=True)
            int8 = NerRuntime(out, quantized=True)
            metrics["test_f1_int8"] = runtime_f1(int8, test, labels["scheme"])
            metrics["int8_f1_delta"] = metrics["test_f1_int8"] - metrics["test_f1_fp32"]
            metrics["int8_mb"] = round((out / QUANTIZED_FILE).stat().st_size / 2**20, 2)
        metrics["model_version"] = info["model_version"]
    write_json(metrics_path, metrics)
    log.info("exported %s: test F1 fp32 %.4f%s", info["model_version"], metrics["test_f1_fp32"],
             f", int8 {metrics['test_f1_int8']:.4f}" if quantize else "")
    return metrics


def main(params: dict[str, Any]) -> None:
    paths, conf = params["paths"], params["export"]
    export(paths["model_dir"], paths["onnx_dir"], paths["conll_dir"], paths["export_metrics"],
           opset=conf["opset"], quantize=conf["quantize"], max_abs_diff=conf["max_abs_diff"])
