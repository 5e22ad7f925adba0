"""Export the emission graph to ONNX, quantize it, and prove both against PyTorch.

The ONNX graph holds encoder + BiLSTM + linear with the first-sub-token
gather; the CRF (transitions, start/end scores, tag names) goes beside it in
``crf.json`` and is decoded in numpy. The export fails, leaving the previous
folder in place, if emissions or decoded tags differ from PyTorch.

Both served files are optimized here, once: the fp32 graph gets attention,
LayerNorm and GELU fused (``onnxruntime.transformers``), and both pass
through ONNX Runtime's graph optimizer and are saved as optimized. The
runtime loads them with optimizations off, so what it serves is exactly the
graph that the parity and F1 checks below ran on. Last, each fused
LayerNorm is written out as plain ops (``pipeline.modeling.layernorm``):
ONNX Runtime's CPU LayerNorm kernels run ~3x slower than those.

int8 is mixed and quantizes the fused graph, so attention stays one
``QAttention`` kernel and the LSTM becomes ``DynamicQuantizeLSTM``.
SmoothQuant first moves activation outliers into the weights. Every MatMul,
the attention and the LSTM are then dynamically quantized with per-channel
int8 weights. ``int8_blockwise`` can make chosen MatMuls 8-bit block-wise
``MatMulNBits`` (activations quantized per block of inputs, per token: the
first layer's feed-forward pair and the second layer's feed-forward output
are the most sensitive, by a per-layer sweep), and ``int8_float`` can leave
some fp32 (closer to fp32, slower). By default none are: block-wise MatMuls
ran at nearly fp32's price, and all dynamic stays within the emission error
limit with an F1 change the test set cannot tell apart (README, "ONNX int8").

That graph is for CPUs with VNNI. Without it (AVX2 only, e.g. Zen 3), ONNX
Runtime multiplies u8 activations by s8 weights with ``vpmaddubsw``, whose
int16 sums saturate: the same graph had 4x the emission error there and ran
at 1.1x fp32 (its block-wise MatMuls ran slower than fp32). So the export
also writes ``model.int8-avx2.onnx`` (``int8_avx2``): every MatMul dynamic,
7-bit weights (``reduce_range``), and the runtime loads the one for its CPU
(``pipeline.runtime.inference.int8_file``). Both are checked against fp32
on the exporting CPU; ``metrics/export.json`` says which (``cpu``).
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
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from pipeline.core.atomic import atomic_dir, write_json
from pipeline.core.config import ExportConfig
from pipeline.core.conll import Sentence, read_conll
from pipeline.core.cpu import cpu_info, describe
from pipeline.core.encoding import load_tokenizer
from pipeline.core.errors import PipelineError
from pipeline.core.metrics import score
from pipeline.modeling.bias_fold import fold_int8_biases
from pipeline.modeling.data import collate, make_examples
from pipeline.modeling.layernorm import split_layer_norms
from pipeline.modeling.model import LABELS, BertBiLstmCrf, load_model
from pipeline.runtime.inference import (
    CRF_FILE,
    INFO_FILE,
    MODEL_FILE,
    OPTIMIZED_LEVEL,
    QUANTIZED_AVX2_FILE,
    QUANTIZED_FILE,
    NerRuntime,
    int8_file,
)
from pipeline.runtime.viterbi import viterbi_decode

log = logging.getLogger(__name__)

INPUTS = ["input_ids", "attention_mask", "word_index", "word_mask"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


class ExportError(PipelineError):
    """The exported graph does not reproduce the PyTorch model."""


def export_onnx(model: BertBiLstmCrf, path: Path, opset: int) -> None:
    """Trace the emission graph; attention is traced in its plain (eager) form, which ORT can fuse."""
    model.eval()
    # any ids inside the vocabulary trace the same graph (a character vocab can be a few thousand entries)
    dummy = (torch.tensor([[1, 2, 3, 4], [1, 2, 4, 0]]) % model.bert.config.vocab_size,
             torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
             torch.tensor([[1, 2], [1, 0]]),
             torch.tensor([[1, 1], [1, 0]]))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "word_index": {0: "batch", 1: "words"}, "word_mask": {0: "batch", 1: "words"},
            "emissions": {0: "batch", 1: "words"}}
    attn = model.bert.config._attn_implementation
    if hasattr(model.bert, "set_attn_implementation"):
        model.bert.set_attn_implementation("eager")  # same maths as sdpa; its ONNX pattern fuses into Attention
    try:
        with torch.inference_mode():
            torch.onnx.export(model, dummy, str(path), input_names=INPUTS, output_names=["emissions"],
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
    finally:
        if hasattr(model.bert, "set_attn_implementation"):
            model.bert.set_attn_implementation(attn)
    onnx.checker.check_model(str(path))


def fuse_transformer(src: Path, dst: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Attention, embedding/skip LayerNorm and bias-GELU fusions of ``onnxruntime.transformers``."""
    from onnxruntime.transformers.optimizer import optimize_model

    fused = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0)
    fused.save_model_to_file(str(dst))
    return {k: v for k, v in fused.get_fused_operator_statistics().items() if v}


def optimize_for_cpu(src: Path, dst: Path) -> None:
    """Run ORT's graph optimizer once and save the result; the runtime then loads it as is."""
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZED_LEVEL
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])


def optimize_for_serving(src: Path, dst: Path, split: bool) -> dict[str, int]:
    """``optimize_for_cpu``, then (``split``) each fused LayerNorm as plain ops, then the int8 MatMuls' biases
    into the MatMuls; returns how many LayerNorms were split and how many biases folded."""
    optimize_for_cpu(src, dst)
    split_count = split_layer_norms(dst, dst) if split else 0
    return {"split_layer_norms": split_count, "folded_biases": fold_int8_biases(dst, dst)}


def calibration_feeds(model: BertBiLstmCrf, sentences: list[Sentence], model_dir: Path,
                      batch_size: int = 32) -> list[dict[str, np.ndarray]]:
    """Padded input batches of ``sentences``, for measuring activation ranges."""
    tokenizer, specials = load_tokenizer(model_dir)
    tags = {t: 0 for s in sentences for t in s.tags}
    examples = sorted(make_examples(sentences, tokenizer, specials, tags, model.head_config.max_length,
                                    model.head_config.window_overlap),
                      key=lambda e: len(e.input_ids))
    return [{k: v.numpy() for k, v in collate(examples[lo:lo + batch_size], specials.pad).items() if k in INPUTS}
            for lo in range(0, len(examples), batch_size)]


def smooth_activations(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], alpha: float) -> int:
    """SmoothQuant: ``X @ W`` becomes ``(X / s) @ (s W)``, the same function in fp32.

    Per-tensor int8 activations lose the small channels next to a few large
    outlier channels (LayerNorm outputs here peak at 15x their median
    channel). ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``, with
    ``max|X_j|`` measured on ``feeds``, moves part of that range into the
    weights, which are quantized per output channel. One ``Mul`` per
    activation tensor, shared by the MatMuls that read it.
    """
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:  # a fused Attention reads its input through packed QKV weights, like a MatMul
        if (node.op_type in ("MatMul", "Attention") and node.input[1] in weights and node.input[0] not in weights
                and len(weights[node.input[1]].dims) == 2):
            readers.setdefault(node.input[0], []).append(node)
    probe = onnx.load(str(src))
    probe.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in readers)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = list(readers)
    amax = {n: np.zeros(0, dtype=np.float32) for n in names}
    for feed in feeds:
        for n, value in zip(names, session.run(names, feed)):
            m = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            amax[n] = m if not amax[n].size else np.maximum(amax[n], m)
    for n, nodes in readers.items():
        ws = [numpy_helper.to_array(weights[node.input[1]]) for node in nodes]
        wmax = np.max([np.abs(w).max(axis=1) for w in ws], axis=0)
        scale = (np.maximum(amax[n], 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)).astype(np.float32)
        inverse = numpy_helper.from_array((1 / scale).astype(np.float32), f"{n}/smooth_scale")
        graph.initializer.append(inverse)
        first = min(list(graph.node).index(node) for node in nodes)
        graph.node.insert(first, helper.make_node("Mul", [n, inverse.name], [f"{n}/smoothed"], name=f"{n}/smooth"))
        for node, w in zip(nodes, ws):
            scaled = numpy_helper.from_array((w * scale[:, None]).astype(np.float32), f"{node.input[1]}/smoothed")
            graph.initializer.append(scaled)
            node.input[0], node.input[1] = f"{n}/smoothed", scaled.name
    used = {i for node in graph.node for i in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return len(readers)


def infer_types(src: Path, dst: Path) -> None:
    """Shapes and types through ORT's contrib ops (Attention, SkipLayerNormalization), which the quantizer
    needs to quantize what follows them; ONNX's own inference stops at the first contrib op."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    onnx.save(SymbolicShapeInference.infer_shapes(onnx.load(str(src)), auto_merge=True), str(dst))


def prepare_int8(src: Path, work: Path, smooth: float = 0.0,
                 feeds: list[dict[str, np.ndarray]] | None = None) -> tuple[Path, dict[str, Any]]:
    """The graph every int8 scheme starts from, made once: the fp32 graph ``src`` with SmoothQuant (strength
    ``smooth``, ranges from ``feeds``) and types through ORT's contrib ops. Returns its path and what was smoothed."""
    smoothed = 0
    if smooth > 0 and feeds:
        smoothed = smooth_activations(src, work / "smoothed.onnx", feeds, smooth)
        src = work / "smoothed.onnx"
    infer_types(src, work / "typed.onnx")
    return work / "typed.onnx", {"smooth_alpha": smooth, "smoothed_inputs": smoothed}


def quantize_int8(typed: Path, dst: Path, work: Path, blockwise: list[str], block_size: int = 128,
                  embeddings: bool = False, keep_float: list[str] | tuple[str, ...] = (),
                  reduce_range: bool = False) -> dict[str, Any]:
    """Mixed int8 of the graph ``prepare_int8`` made (fused or not): ``blockwise`` MatMuls as 8-bit MatMulNBits,
    ``keep_float`` ones left fp32, the rest (fused Attention and the LSTM included) dynamic per-channel int8,
    with 7-bit weights if ``reduce_range`` (so that u8s8 products cannot saturate on CPUs without VNNI).

    Quantizing the fused graph keeps attention in one ``QAttention`` kernel; quantizing the unfused one
    leaves a dozen small ops per layer (transposes, scaled matmuls, softmax) that cost ~20% of int8 time.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    stage = typed
    model = onnx.load(str(stage))
    weights = {t.name for t in model.graph.initializer}
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    floats = [n for n in matmuls if any(p in n for p in keep_float)]
    chosen = [n for n in matmuls if any(p in n for p in blockwise) and n not in floats]
    if chosen:
        nbits = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, is_symmetric=True, accuracy_level=4,
                                     op_types_to_quantize=("MatMul",),
                                     nodes_to_exclude=[n for n in matmuls if n not in chosen])
        nbits.process()
        stage = work / "blockwise.onnx"
        nbits.model.save_model_to_file(str(stage), use_external_data_format=False)
    embedding_ops = ["Gather", "EmbedLayerNormalization"] if embeddings else []
    quantize_dynamic(str(stage), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range,
                     op_types_to_quantize=["MatMul", "Attention", "LSTM"] + embedding_ops,
                     nodes_to_exclude=floats,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True})
    return {"blockwise_matmuls": len(chosen), "float_matmuls": len(floats),
            "dynamic_matmuls": len(matmuls) - len(chosen) - len(floats),
            "quantized_attention": sum(n.op_type == "Attention" for n in model.graph.node),
            "block_size": block_size, "embeddings": embeddings, "weight_bits": 7 if reduce_range else 8}


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
    examples = make_examples(sentences, tokenizer, specials, tag_to_id, model.head_config.max_length,
                             model.head_config.window_overlap)
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


def int8_agreement(fp32: NerRuntime, int8: NerRuntime, sentences: list[Sentence],
                   scheme: str) -> tuple[dict[str, Any], float, float]:
    """How far int8 moves from fp32 on ``sentences`` (emission error, changed decoded paths), and the F1 of
    each, from one pass of each graph."""
    words, gold = [s.tokens for s in sentences], [s.tags for s in sentences]
    emissions_fp32, emissions_int8 = fp32.word_emissions(words), int8.word_emissions(words)
    tags_fp32, tags_int8 = fp32.decode_tags(emissions_fp32), int8.decode_tags(emissions_int8)
    a, b = np.concatenate(emissions_fp32), np.concatenate(emissions_int8)
    agreement = {"relative_emission_error": float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12)),
                 "changed_sequences": sum(x != y for x, y in zip(tags_fp32, tags_int8)), "sequences": len(words)}
    return agreement, score(gold, tags_fp32, scheme)["f1"], score(gold, tags_int8, scheme)["f1"]


def int8_graphs(config: ExportConfig) -> list[tuple[str, str, dict[str, Any]]]:
    """The int8 graphs to write: (file, key of its figures in the metrics ("": top level), quantize_int8 keywords).
    ``model.int8.onnx`` for CPUs with VNNI, and (``int8_avx2``) ``model.int8-avx2.onnx`` for CPUs without: there
    u8s8 products saturate, so its weights are 7-bit, and block-wise MatMuls ran slower than fp32, so it has none."""
    common = {"block_size": config.int8_block_size, "embeddings": config.int8_embeddings}
    graphs = [(QUANTIZED_FILE, "", {**common, "blockwise": list(config.int8_blockwise),
                                    "keep_float": list(config.int8_float)})]
    if config.int8_avx2:
        graphs.append((QUANTIZED_AVX2_FILE, "int8_avx2", {**common, "blockwise": [],
                                                         "keep_float": list(config.int8_avx2_float),
                                                         "reduce_range": True}))
    return graphs


def int8_figures(fp32: NerRuntime, int8: NerRuntime, dev: list[Sentence], test: list[Sentence],
                 scheme: str) -> dict[str, Any]:
    """How far an int8 graph moves from fp32 on this CPU: emission error and changed paths on dev and test, and
    the F1 change on both."""
    on_test, test_f1_fp32, test_f1_int8 = int8_agreement(fp32, int8, test, scheme)
    on_dev, dev_f1_fp32, dev_f1_int8 = int8_agreement(fp32, int8, dev, scheme)
    # the change on dev is a second sample of the same drop: on a few hundred sentences either one moves by ~1 point
    return {"test_f1_int8": test_f1_int8, "int8_f1_delta": test_f1_int8 - test_f1_fp32,
            "int8_f1_delta_dev": dev_f1_int8 - dev_f1_fp32, "int8_vs_fp32_dev": on_dev, "int8_vs_fp32_test": on_test}


def export(model_dir: str | Path, onnx_dir: str | Path, conll_dir: str | Path, metrics_path: str | Path,
           config: ExportConfig = ExportConfig()) -> dict[str, Any]:
    model_dir, conll_dir = Path(model_dir), Path(conll_dir)
    model, labels = load_model(model_dir)
    dev = list(read_conll(conll_dir / "dev.conll"))
    test = list(read_conll(conll_dir / "test.conll"))
    metrics: dict[str, Any] = {"cpu": describe()}  # int8 error and speed depend on the ISA (VNNI or not)
    with atomic_dir(onnx_dir) as out:
        work = out / ".work"
        work.mkdir()
        raw = work / "raw.onnx"
        export_onnx(model, raw, config.opset)
        fp32_src = raw
        if config.fuse:
            fp32_src = work / "fused.onnx"
            bert = model.bert.config
            metrics["fused_ops"] = fuse_transformer(raw, fp32_src, bert.num_attention_heads, bert.hidden_size)
        metrics["split_layer_norms"] = optimize_for_serving(fp32_src, out / MODEL_FILE,
                                                            config.split_layer_norms)["split_layer_norms"]
        (out / CRF_FILE).write_text(json.dumps(crf_dict(model, labels["tags"])) + "\n")
        (out / LABELS).write_text(json.dumps(labels, indent=2, ensure_ascii=False) + "\n")
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, out / name)
        digest = hashlib.sha256((out / MODEL_FILE).read_bytes()).hexdigest()[:12]
        info = {"model_version": f"bert-bilstm-crf-{digest}", "entity_types": labels["entity_types"],
                "scheme": labels["scheme"], "max_length": model.head_config.max_length,
                "window_overlap": model.head_config.window_overlap,
                "encoder_layers": model.bert.config.num_hidden_layers, "hidden_size": model.bert.config.hidden_size,
                "graph_optimized": True}
        write_json(out / INFO_FILE, info)

        runtime = NerRuntime(out, threads=config.threads)
        parity = check_parity(model, runtime, dev, out)
        metrics["parity"] = parity
        log.info("parity on %d dev sequences: max |diff| %.2e, %d decoded paths differ", parity["sequences"],
                 parity["max_abs_diff"], parity["mismatched_sequences"])
        if parity["max_abs_diff"] > config.max_abs_diff or parity["mismatched_sequences"]:
            raise ExportError(f"ONNX does not reproduce PyTorch: max |emission diff| {parity['max_abs_diff']:.2e} "
                              f"(tolerance {config.max_abs_diff:.0e}), {parity['mismatched_sequences']} dev "
                              "sequences decode differently")
        metrics["test_f1_fp32"] = runtime_f1(runtime, test, labels["scheme"])
        metrics["onnx_mb"] = round((out / MODEL_FILE).stat().st_size / 2**20, 2)
        if config.quantize:
            feeds = None
            if config.int8_smooth > 0:
                calibration = list(read_conll(conll_dir / "train.conll"))[:config.int8_calibration]
                feeds = calibration_feeds(model, calibration, model_dir)
            typed, smoothing = prepare_int8(fp32_src, work, config.int8_smooth, feeds)
            for name, key, scheme in int8_graphs(config):
                figures = {"int8_scheme": {**quantize_int8(typed, work / "int8.onnx", work, **scheme), **smoothing}}
                figures["int8_scheme"]["folded_biases"] = optimize_for_serving(
                    work / "int8.onnx", out / name, config.split_layer_norms)["folded_biases"]
                int8 = NerRuntime(out, threads=config.threads, onnx_file=name)
                figures.update(int8_figures(runtime, int8, dev, test, labels["scheme"]))
                figures["int8_mb"] = round((out / name).stat().st_size / 2**20, 2)
                log.info("%s on this CPU: dev emission error %.4f, test F1 %+.2f points", name,
                         figures["int8_vs_fp32_dev"]["relative_emission_error"], 100 * figures["int8_f1_delta"])
                metrics.update(figures if not key else {key: figures})
            metrics["int8_graph_here"] = int8_file(out, bool(cpu_info()["vnni"]))
        metrics["model_version"] = info["model_version"]
        shutil.rmtree(work)
    write_json(metrics_path, metrics)
    log.info("exported %s: test F1 fp32 %.4f", info["model_version"], metrics["test_f1_fp32"])
    return metrics
