"""LayerNorm as plain ONNX ops in the served graphs, because ONNX Runtime's CPU LayerNorm kernels are slow.

ONNX Runtime 1.32's CPU ``SkipLayerNormalization`` (and ``LayerNormalization``, the same code) ran a
(32, 48, 384) tensor in 1.75 ms on 2 threads of an AMD EPYC (AVX2), where the same maths as ten
element-wise and reduce ops took 0.58-0.70 ms and PyTorch's add + layer_norm 0.33 ms; in the whole
graph those kernels were 8% of fp32 and 13% of int8 time. :func:`split_layer_norms` rewrites every
``SkipLayerNormalization`` (and ONNX ``LayerNormalization``) of a graph that export has already
optimized (the runtime loads such graphs with optimizations off, so nothing fuses them back) into::

    x = input + bias + skip
    c = x - mean(x)
    y = c / sqrt(mean(c * c) + epsilon) * gamma + beta

which is the kernel's definition in fp32 (the parity check against PyTorch still runs on the result).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

SKIP_LAYER_NORM = ("com.microsoft", "SkipLayerNormalization")  # (input, skip, gamma, beta?, bias?)
LAYER_NORM = ("", "LayerNormalization")  # ONNX's own (input, gamma, beta?), what ORT fuses when there is no skip


def _epsilon(node: onnx.NodeProto) -> float:
    for attribute in node.attribute:
        if attribute.name == "epsilon":
            return float(helper.get_attribute_value(attribute))
    return 1e-12 if node.op_type == SKIP_LAYER_NORM[1] else 1e-5  # each op's default


def _reduce_mean(x: str, out: str, name: str, axes_input: str) -> onnx.NodeProto:
    """Mean over the last axis, kept: ``axes`` is an attribute before opset 18 and an input from it."""
    if axes_input:
        return helper.make_node("ReduceMean", [x, axes_input], [out], name=name, keepdims=1)
    return helper.make_node("ReduceMean", [x], [out], name=name, axes=[-1], keepdims=1)


def _splittable(node: onnx.NodeProto) -> bool:
    """A LayerNorm over the last axis whose only output is the normalized tensor."""
    if (node.domain or "", node.op_type) == SKIP_LAYER_NORM:
        return len(node.output) == 1
    if (node.domain or "", node.op_type) == LAYER_NORM:
        axis = [helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"]
        return len([o for o in node.output if o]) == 1 and axis in ([], [-1])
    return False


def _split(node: onnx.NodeProto, eps_name: str, axes_input: str) -> list[onnx.NodeProto]:
    """The plain ops of one LayerNorm that :func:`_splittable` accepts."""
    name = node.name or node.output[0]
    if node.op_type == LAYER_NORM[1]:
        x, gamma, beta = (list(node.input) + [""])[:3]
        skip, bias = "", ""
    else:
        x, skip, gamma, beta, bias = (list(node.input) + [""] * 5)[:5]

    def t(suffix: str) -> str:  # the name of an intermediate tensor or node
        return f"{name}/{suffix}"

    nodes = []
    if bias:  # the dense layer's bias, then the residual: PyTorch's order (one ONNX Sum of three was slower)
        nodes.append(helper.make_node("Add", [x, bias], [t("biased")], name=t("AddBias")))
        x = t("biased")
    if skip:
        nodes.append(helper.make_node("Add", [x, skip], [t("sum")], name=t("AddSkip")))
        x = t("sum")
    nodes += [
        _reduce_mean(x, t("mean"), t("Mean"), axes_input),
        helper.make_node("Sub", [x, t("mean")], [t("centered")], name=t("Center")),
        helper.make_node("Mul", [t("centered"), t("centered")], [t("square")], name=t("Square")),
        _reduce_mean(t("square"), t("variance"), t("Variance"), axes_input),
        helper.make_node("Add", [t("variance"), eps_name], [t("variance_eps")], name=t("AddEpsilon")),
        helper.make_node("Sqrt", [t("variance_eps")], [t("std")], name=t("Std")),
        helper.make_node("Div", [t("centered"), t("std")], [t("normed")], name=t("Normalize")),
    ]
    scaled = node.output[0] if not beta else t("scaled")
    nodes.append(helper.make_node("Mul", [t("normed"), gamma], [scaled], name=t("Scale")))
    if beta:
        nodes.append(helper.make_node("Add", [scaled, beta], [node.output[0]], name=t("Shift")))
    return nodes


def split_layer_norms(src: Path, dst: Path) -> int:
    """Write ``src`` to ``dst`` with every LayerNorm (``SkipLayerNormalization``, ``LayerNormalization``) as
    plain ops; returns how many were split. Nodes that also output their mean, variance or sum, and
    LayerNorms over other axes, are left as they are."""
    model = onnx.load(str(src))
    graph = model.graph
    nodes, split, epsilons = [], 0, {}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    axes_input = "layernorm_last_axis" if opset >= 18 else ""
    for node in graph.node:
        if not _splittable(node):
            nodes.append(node)
            continue
        eps = _epsilon(node)
        if eps not in epsilons:
            epsilons[eps] = f"layernorm_epsilon_{len(epsilons)}"
            graph.initializer.append(numpy_helper.from_array(np.array(eps, dtype=np.float32), epsilons[eps]))
        nodes.extend(_split(node, epsilons[eps], axes_input))
        split += 1
    if split and axes_input:
        graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), axes_input))
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return split
