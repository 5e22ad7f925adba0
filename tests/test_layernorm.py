"""The served graphs' LayerNorms as plain ops: the same function as ONNX Runtime's fused kernels."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.modeling.layernorm import split_layer_norms

HIDDEN = 48


def layer_norm_graph(nodes, opset: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(1, 0.3, HIDDEN).astype(np.float32), name)
               for name in ("gamma", "beta", "bias")] + [numpy_helper.from_array(np.float32(1e-3), "tiny")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", HIDDEN]) for n in ("x", "skip")]
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["batch", "seq", HIDDEN])
               for n in nodes for o in n.output if o]
    graph = helper.make_graph(nodes, "layernorms", inputs, outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid("com.microsoft", 1)])


def run(path, feed):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as the runtime loads them
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.mark.parametrize("opset", [17, 18])
def test_split_layer_norms_compute_what_the_fused_kernels_compute(tmp_path, opset):
    skip_ln = "com.microsoft"
    nodes = [
        helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"], ["full"],
                         domain=skip_ln, epsilon=1e-12),
        helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma"], ["no_beta_no_bias"], domain=skip_ln),
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["plain"], axis=-1, epsilon=1e-5),
        # a variance near the default epsilon (1e-5), which then matters
        helper.make_node("Mul", ["x", "tiny"], ["small"]),
        helper.make_node("LayerNormalization", ["small", "gamma"], ["default_eps"]),
        # left alone: a second output (the sum) that the split form does not give, and another axis
        helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta"], ["kept", "", "", "kept_sum"],
                         domain=skip_ln),
        helper.make_node("LayerNormalization", ["x", "gamma"], ["other_axis"], axis=1),
    ]
    fused, split = tmp_path / "fused.onnx", tmp_path / "split.onnx"
    onnx.save(layer_norm_graph(nodes, opset), str(fused))
    assert split_layer_norms(fused, split) == 4
    ops = [n.op_type for n in onnx.load(str(split)).graph.node]
    assert ops.count("SkipLayerNormalization") == 1 and ops.count("LayerNormalization") == 1

    rng = np.random.default_rng(1)
    # an offset and an outlier channel, as transformer activations have
    x = (rng.normal(3, 2, (4, 7, HIDDEN)) * np.where(np.arange(HIDDEN) == 5, 20, 1)).astype(np.float32)
    feed = {"x": x, "skip": rng.normal(0, 1, x.shape).astype(np.float32)}
    for want, got in zip(run(fused, feed), run(split, feed)):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    # and the definition itself: (x + bias + skip) normalized over the last axis, scaled and shifted
    summed = x + numpy_helper.to_array(onnx.load(str(fused)).graph.initializer[2]) + feed["skip"]
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(fused)).graph.initializer}
    expected = ((summed - summed.mean(-1, keepdims=True)) / np.sqrt(summed.var(-1, keepdims=True) + 1e-12)
                * weights["gamma"] + weights["beta"])
    np.testing.assert_allclose(run(split, feed)[0], expected, atol=2e-5, rtol=1e-5)


def test_a_graph_without_layer_norms_is_written_unchanged(tmp_path):
    nodes = [helper.make_node("Add", ["x", "skip"], ["sum"])]
    src, dst = tmp_path / "src.onnx", tmp_path / "dst.onnx"
    onnx.save(layer_norm_graph(nodes, 18), str(src))
    assert split_layer_norms(src, dst) == 0
    assert onnx.load(str(dst)).graph == onnx.load(str(src)).graph
