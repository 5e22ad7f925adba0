"""The shared ONNX runtime: batch-independent results, long texts, offsets, and no torch."""

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.core.encoding import Window, plan_windows, texts_word_pieces, window_inputs, word_pieces
from pipeline.core.words import split_words
from pipeline.runtime.inference import NerRuntime, length_batches
from tests.conftest import SPECIAL_TEXTS

pytestmark = pytest.mark.slow


def test_windows_cover_every_word_once_and_respect_the_budget():
    counts = [1, 3, 2, 5, 1, 1, 4, 2, 2, 3, 1, 1, 6, 2] * 5
    windows = plan_windows(counts, max_tokens=12, overlap=0.5)
    assert len(windows) > 1
    owned = []
    for w in windows:
        assert sum(counts[w.lo:w.hi]) <= 12
        assert w.lo <= w.own_lo < w.own_hi <= w.hi
        owned.extend(range(w.own_lo, w.own_hi))
    assert owned == list(range(len(counts)))
    assert plan_windows([3, 4], max_tokens=12, overlap=0.5)[0].own_hi == 2


def test_length_batches_bound_items_and_padded_cells():
    lengths = [1] * 5 + [10] * 4 + [40, 400]
    batches = length_batches(list(range(len(lengths))), lengths, rows=3, cells=40)
    assert batches == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9], [10]]  # the 400-word text alone, over the budget
    assert [i for b in batches for i in b] == list(range(len(lengths)))


def test_onnx_runs_hold_at_most_run_tokens_and_give_the_same_emissions(pipeline_run):
    """A long document's windows are cut into runs of at most ``run_tokens`` sub-tokens (windows x the longest):
    what bounds the encoder's activations; the emissions do not depend on it."""
    texts = [" ".join(f"w{i} Paris" for i in range(n)) for n in (3, 40, 400, 900)]
    words = [t.split() for t in texts]
    wide = NerRuntime(pipeline_run.path("onnx_dir"), batch_size=32, run_tokens=10_000)
    tight = NerRuntime(pipeline_run.path("onnx_dir"), batch_size=32, run_tokens=200)
    runs = []
    original = tight._run
    tight._run = lambda batch: runs.append(len(batch) * max(len(w.input_ids) for w in batch)) or original(batch)
    for a, b in zip(wide.word_emissions(words), tight.word_emissions(words)):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert len(runs) > 3 and max(runs) <= 200


def test_results_do_not_depend_on_batch_company(pipeline_run):
    runtime = NerRuntime(pipeline_run.path("onnx_dir"), batch_size=8)
    text = "Barack Obama met Angela Merkel in Berlin"
    alone = runtime.word_emissions([text.split()])[0]
    crowd = runtime.word_emissions([["a"] * 40, text.split(), ["b", "c"]])[1]
    np.testing.assert_allclose(alone, crowd, atol=1e-4)


def test_long_document_is_windowed_with_exact_offsets(pipeline_run):
    runtime = NerRuntime(pipeline_run.path("onnx_dir"))
    assert runtime.max_tokens < 100  # the tiny test encoder has 64 positions: many windows
    text = " ".join(f"Paris 😀 {i} 北京 Obama\r\n" for i in range(1500))
    assert len(text) > 20_000
    [pred] = runtime.predict([text])
    for entity in pred.entities:
        assert text[entity.start:entity.end] == entity.text
    from pipeline.core.words import split_words

    emissions = runtime.word_emissions([[text[s:e] for s, e in split_words(text)]])[0]
    assert np.all(np.abs(emissions).sum(axis=1) > 0)  # every word got an emission from some window


def test_runtime_runs_without_torch(pipeline_run):
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "from pipeline.runtime.inference import NerRuntime\n"
        f"r = NerRuntime({str(pipeline_run.path('onnx_dir'))!r})\n"
        "p = r.predict(['Obama in Paris', '北京'])\n"
        f"q = NerRuntime({str(pipeline_run.path('onnx_dir'))!r}, quantized=True).predict(['Obama in Paris'])\n"
        "assert len(q) == 1\n"
        "import json; print(json.dumps([x.to_dict() for x in p]))\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules if sys.modules[m] is not None)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == 2


def test_batched_decoding_equals_one_text_at_a_time(pipeline_run):
    runtime = NerRuntime(pipeline_run.path("onnx_dir"), batch_size=4)
    texts = ["Barack Obama in Paris", "", "北京 😀 Obama", "a b c d e f g h i j k l m n o p", "Apple"] * 3
    batched = [p.to_dict() for p in runtime.predict(texts)]
    single = [runtime.predict([t])[0].to_dict() for t in texts]
    assert batched == single
    assert runtime.tag_words([t.split() for t in texts]) == [runtime.tag_words([t.split()])[0] for t in texts]


def test_word_pieces_of_many_texts_at_once_equal_each_text_encoded_alone(pipeline_run):
    runtime = NerRuntime(pipeline_run.path("onnx_dir"))
    tokenizer, specials = runtime.tokenizer, runtime.specials
    texts = [["Barack", "Obama"], [], ["北", "京", "😀"], ["\u0301", "x"], ["supercalifragilistic" * 4], [],
             ["New", "York"] * 1500]

    def alone(words: list[str]) -> list[list[int]]:  # one text, through encode (the call that holds the GIL)
        pieces: list[list[int]] = [[] for _ in words]
        if words:
            enc = tokenizer.encode(words, is_pretokenized=True, add_special_tokens=False)
            for token_id, word_id in zip(enc.ids, enc.word_ids):
                if word_id is not None and len(pieces[word_id]) < 3:
                    pieces[word_id].append(token_id)
        return [p or [specials.unk] for p in pieces]

    expected = [alone(words) for words in texts]
    assert texts_word_pieces(tokenizer, specials, texts, 3) == expected
    assert [word_pieces(tokenizer, specials, words, 3) for words in texts] == expected
    assert expected[3][0] == [specials.unk] and len(expected[4][0]) == 3  # a dropped mark; a word cut at 3


def _single_pass(runtime: NerRuntime, words: list[str]) -> np.ndarray:
    """Emissions of ``words`` from one encoder call on all of them, built by hand."""
    pieces = word_pieces(runtime.tokenizer, runtime.specials, words, runtime.max_tokens)
    ids, first = window_inputs(pieces, Window(0, len(words), 0, len(words)), runtime.specials)
    ones = np.ones((1, len(ids)), dtype=np.int64)
    return runtime.emissions(np.array([ids], dtype=np.int64), ones, np.array([first], dtype=np.int64),
                             np.ones((1, len(first)), dtype=np.int64))[0]


def _words_with_pieces(runtime: NerRuntime, n_pieces: int) -> list[str]:
    words, used = [], 0
    vocab = ["Obama", "visited", "北", "京", "😀", "Merkel", "in", "Berlin", "yesterday", ","]
    while used < n_pieces:
        turn = len(words) % len(vocab)
        for w in vocab[turn:] + vocab[:turn] + ["the"]:  # "the" is one sub-token: it fills the budget exactly
            count = len(word_pieces(runtime.tokenizer, runtime.specials, [w], runtime.max_tokens)[0])
            if used + count <= n_pieces and (w == "the" or used + count + 1 <= n_pieces):
                words.append(w)
                used += count
                break
    return words


def test_text_that_fits_takes_one_window_equal_to_a_single_pass(pipeline_run):
    runtime = NerRuntime(pipeline_run.path("onnx_dir"))
    words = _words_with_pieces(runtime, runtime.max_tokens)  # exactly the budget: still one window
    pieces = word_pieces(runtime.tokenizer, runtime.specials, words, runtime.max_tokens)
    assert sum(map(len, pieces)) == runtime.max_tokens
    assert plan_windows([len(p) for p in pieces], runtime.max_tokens, runtime.window_overlap) == [
        Window(0, len(words), 0, len(words))]
    np.testing.assert_allclose(runtime.word_emissions([words])[0], _single_pass(runtime, words), atol=1e-5)


def test_each_word_of_a_long_text_gets_the_single_pass_of_the_window_that_owns_it(pipeline_run):
    runtime = NerRuntime(pipeline_run.path("onnx_dir"), batch_size=4)
    words = _words_with_pieces(runtime, 4 * runtime.max_tokens + 7)
    pieces = word_pieces(runtime.tokenizer, runtime.specials, words, runtime.max_tokens)
    windows = plan_windows([len(p) for p in pieces], runtime.max_tokens, runtime.window_overlap)
    assert len(windows) > 2
    stitched = runtime.word_emissions([words])[0]
    for w in windows:
        alone = _single_pass(runtime, words[w.lo:w.hi])
        np.testing.assert_allclose(stitched[w.own_lo:w.own_hi], alone[w.own_lo - w.lo:w.own_hi - w.lo], atol=1e-5)
        # the owned words sit in the middle of their window, with context on both sides
        assert w.own_lo == 0 or w.own_lo > w.lo
        assert w.own_hi == len(words) or w.own_hi < w.hi


@pytest.mark.parametrize("text", SPECIAL_TEXTS + ["a\r\nb 😀 c\r\n\r\n北京 👨‍👩‍👧 d", "\ufeff北\u200b京 e\u0301 ok"])
def test_entity_offsets_are_exact_code_point_slices(pipeline_run, monkeypatch, text):
    """Whatever the model says: force the tags and check the spans it turns into, word by word."""
    import pipeline.runtime.inference as inference

    runtime = NerRuntime(pipeline_run.path("onnx_dir"))
    words = split_words(text)
    b_tag, i_tag = runtime.tags.index("B-person"), runtime.tags.index("I-person")
    for forced, expected in (
        (lambda n: [b_tag] * n, [(s, e) for s, e in words]),                    # every word its own entity
        (lambda n: [b_tag] + [i_tag] * (n - 1), [(words[0][0], words[-1][1])]),  # one entity over all words
    ):
        def decode(emissions, mask, crf, forced=forced):
            lengths = mask.sum(axis=1)
            return [forced(int(n)) for n in lengths], np.zeros(len(lengths), dtype=np.float32)

        monkeypatch.setattr(inference, "viterbi_decode", decode)
        [pred] = runtime.predict([text])
        assert [(e.start, e.end) for e in pred.entities] == expected
        for e in pred.entities:
            assert e.text == text[e.start:e.end] and e.label == "person" and 0.0 <= e.score <= 1.0


def test_the_runtime_stops_spinning_when_its_calls_return(pipeline_run):
    """An idle runtime (the service between requests, a loop waiting for jobs) must not keep its ONNX Runtime
    threads spin-waiting for work that is not coming: on a small box they hold the cores the event loop needs."""
    from pipeline.runtime.inference import NerRuntime, length_batches

    for quantized in (False, True):
        runtime = NerRuntime(pipeline_run.path("onnx_dir"), quantized=quantized, threads=2)
        options = runtime.session.get_session_options()
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"
        assert options.intra_op_num_threads == 2


def test_served_graphs_were_optimized_once_at_export(pipeline_run):
    import onnx
    import onnxruntime as ort

    from pipeline.runtime.inference import session_options

    folder = pipeline_run.path("onnx_dir")
    assert json.loads((folder / "model_info.json").read_text())["graph_optimized"] is True
    # loaded as saved: the graph that export's parity and F1 checks ran on, not rebuilt at load
    assert session_options(optimized=True).graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fp32 = {n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node}
    assert "Attention" in fp32
    # words and the BiLSTM's reversals are row copies (model.gather_rows), not an int64 index as large as the states
    assert "Gather" in fp32 and not fp32 & {"GatherElements", "Expand"}
    # every LayerNorm served as plain ops (ORT's CPU LayerNorm kernels are the slow way), in each graph
    layers = json.loads((folder / "model_info.json").read_text())["encoder_layers"]
    metrics = json.loads(pipeline_run.path("export_metrics").read_text())
    assert metrics["split_layer_norms"] == 2 * layers
    for name in ("model.onnx", "model.int8.onnx", "model.int8-avx2.onnx"):
        served = {n.op_type for n in onnx.load(str(folder / name)).graph.node}
        assert not served & {"SkipLayerNormalization", "LayerNormalization"} and "ReduceMean" in served, name
    int8 = onnx.load(str(folder / "model.int8.onnx")).graph.node
    ops = {n.op_type for n in int8}
    # the fused graph is quantized: attention stays one kernel, the LSTM is int8 too
    assert {"QAttention", "DynamicQuantizeLSTM"} <= ops and "Attention" not in ops
    assert ops & {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
    # just the MatMuls that export.int8_blockwise names are 8-bit block-wise (params.yaml names none: all dynamic;
    # test_int8_scheme_puts_each_matmul_where_its_pattern_says checks the block-wise path itself)
    named = pipeline_run.params["export"]["int8_blockwise"]
    blockwise = [n.name for n in int8 if n.op_type == "MatMulNBits"]
    assert all(any(p in name for p in named) for name in blockwise) and bool(blockwise) == bool(named)
    assert metrics["int8_scheme"]["blockwise_matmuls"] == len(blockwise)
    assert metrics["int8_scheme"]["dynamic_matmuls"] > 0 and metrics["int8_scheme"]["smoothed_inputs"] > 0
    assert metrics["int8_scheme"]["quantized_attention"] == layers == sum(n.op_type == "QAttention" for n in int8)
    # the dense layers' biases ride in their int8 MatMuls (bias_fold.py), in both int8 graphs
    assert metrics["int8_scheme"]["folded_biases"] == 3 * layers == metrics["int8_avx2"]["int8_scheme"]["folded_biases"]
    assert "BiasGelu" not in ops and "Gelu" in ops
    assert metrics["int8_vs_fp32_test"]["sequences"] > 0


def test_cpus_without_vnni_load_an_int8_graph_whose_products_cannot_saturate(pipeline_run, tmp_path):
    import shutil

    import onnx
    from onnx import numpy_helper

    from pipeline.core.cpu import cpu_info
    from pipeline.runtime.inference import QUANTIZED_AVX2_FILE, QUANTIZED_FILE, int8_file

    folder = pipeline_run.path("onnx_dir")

    def int8_weights(name):
        graph = onnx.load(str(folder / name)).graph
        return {n.op_type for n in graph.node}, [numpy_helper.to_array(t) for t in graph.initializer
                                                 if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]

    ops, weights = int8_weights(QUANTIZED_AVX2_FILE)
    assert {"QAttention", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul"} <= ops and "MatMulNBits" not in ops
    # 7-bit weights: two u8 x s7 products summed stay inside the int16 of AVX2's vpmaddubsw (255 * 64 * 2 < 32767)
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64
    _, vnni_weights = int8_weights(QUANTIZED_FILE)  # VNNI sums in int32: full 8-bit weights
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in vnni_weights) == 127
    metrics = json.loads(pipeline_run.path("export_metrics").read_text())
    assert metrics["int8_avx2"]["int8_scheme"]["weight_bits"] == 7 and metrics["int8_scheme"]["weight_bits"] == 8
    assert metrics["int8_avx2"]["int8_vs_fp32_dev"]["sequences"] > 0

    # chosen at load by the CPU the runtime runs on, and said in the version
    assert int8_file(folder, vnni=True) == QUANTIZED_FILE and int8_file(folder, vnni=False) == QUANTIZED_AVX2_FILE
    here = QUANTIZED_FILE if cpu_info()["vnni"] else QUANTIZED_AVX2_FILE
    runtime = NerRuntime(folder, quantized=True)
    assert runtime.onnx_path.name == metrics["int8_graph_here"] == here
    assert runtime.model_version.endswith("-int8" if cpu_info()["vnni"] else "-int8-avx2")
    # a folder exported before there were two: model.int8.onnx on every CPU
    old = tmp_path / "old"
    shutil.copytree(folder, old, ignore=shutil.ignore_patterns(QUANTIZED_AVX2_FILE))
    assert int8_file(old, vnni=False) == QUANTIZED_FILE == NerRuntime(old, quantized=True).onnx_path.name


def test_int8_scheme_puts_each_matmul_where_its_pattern_says(pipeline_run, tmp_path):
    import onnx

    from pipeline.modeling.export import export_onnx, fuse_transformer, prepare_int8, quantize_int8
    from pipeline.modeling.model import load_model

    model, _ = load_model(pipeline_run.path("model_dir"))
    export_onnx(model, tmp_path / "raw.onnx", opset=17)
    config = model.bert.config
    fuse_transformer(tmp_path / "raw.onnx", tmp_path / "fused.onnx", config.num_attention_heads, config.hidden_size)
    fused = onnx.load(str(tmp_path / "fused.onnx")).graph
    weights = {t.name for t in fused.initializer}
    with_weights = [n.name for n in fused.node if n.op_type == "MatMul" and n.input[1] in weights]
    float_patterns = ["/encoder/layer.1/output/dense/", "/encoder/layer.0/output/dense/"]
    typed, _ = prepare_int8(tmp_path / "fused.onnx", tmp_path)
    info = quantize_int8(typed, tmp_path / "int8.onnx", tmp_path, blockwise=["/encoder/layer.0/"],
                         keep_float=float_patterns)
    nodes = onnx.load(str(tmp_path / "int8.onnx")).graph.node
    floats = sorted(n.name for n in nodes if n.op_type == "MatMul" and n.name in with_weights)
    assert floats == sorted(n for n in with_weights if any(p in n for p in float_patterns)) and len(floats) == 2
    blockwise = [n for n in with_weights if "/encoder/layer.0/" in n and n not in floats]  # float wins
    assert sum(n.op_type == "MatMulNBits" for n in nodes) == len(blockwise) == info["blockwise_matmuls"] > 0
    assert info["float_matmuls"] == 2 and info["dynamic_matmuls"] > 0


def test_smoothing_rewrite_leaves_the_fp32_function_unchanged(pipeline_run, tmp_path):
    from pipeline.core.conll import read_conll
    from pipeline.modeling.export import calibration_feeds, smooth_activations
    from pipeline.modeling.model import load_model

    folder = pipeline_run.path("onnx_dir")
    model, _ = load_model(pipeline_run.path("model_dir"))
    sentences = list(read_conll(pipeline_run.path("conll_dir") / "dev.conll"))[:40]
    feeds = calibration_feeds(model, sentences, folder, batch_size=16)
    assert smooth_activations(folder / "model.onnx", tmp_path / "smoothed.onnx", feeds, alpha=0.8) > 0
    import onnxruntime as ort

    plain = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    smoothed = ort.InferenceSession(str(tmp_path / "smoothed.onnx"), providers=["CPUExecutionProvider"])
    for feed in feeds:
        np.testing.assert_allclose(smoothed.run(None, feed)[0], plain.run(None, feed)[0], atol=1e-4, rtol=1e-4)


def test_folding_int8_biases_into_their_matmuls_keeps_every_emission_bit_for_bit(pipeline_run, tmp_path):
    import onnx
    import onnxruntime as ort

    from pipeline.core.conll import read_conll
    from pipeline.modeling.bias_fold import fold_int8_biases
    from pipeline.modeling.export import (calibration_feeds, export_onnx, fuse_transformer, optimize_for_cpu,
                                          prepare_int8, quantize_int8)
    from pipeline.modeling.layernorm import split_layer_norms
    from pipeline.modeling.model import load_model

    model, _ = load_model(pipeline_run.path("model_dir"))
    export_onnx(model, tmp_path / "raw.onnx", opset=17)
    config = model.bert.config
    fuse_transformer(tmp_path / "raw.onnx", tmp_path / "fused.onnx", config.num_attention_heads, config.hidden_size)
    typed, _ = prepare_int8(tmp_path / "fused.onnx", tmp_path)
    quantize_int8(typed, tmp_path / "int8.onnx", tmp_path, blockwise=[])
    optimize_for_cpu(tmp_path / "int8.onnx", tmp_path / "served.onnx")
    split_layer_norms(tmp_path / "served.onnx", tmp_path / "served.onnx")
    layers = config.num_hidden_layers
    # attention output and feed-forward output (an Add each) and the intermediate (a BiasGelu) of every layer
    assert fold_int8_biases(tmp_path / "served.onnx", tmp_path / "folded.onnx") == 3 * layers
    before = onnx.load(str(tmp_path / "served.onnx")).graph.node
    after = onnx.load(str(tmp_path / "folded.onnx")).graph.node
    assert sum(n.op_type == "BiasGelu" for n in before) == layers and "BiasGelu" not in {n.op_type for n in after}
    assert sum(n.op_type == "Add" for n in before) - sum(n.op_type == "Add" for n in after) == 2 * layers
    sentences = list(read_conll(pipeline_run.path("conll_dir") / "dev.conll"))[:40]
    feeds = calibration_feeds(model, sentences, pipeline_run.path("onnx_dir"), batch_size=16)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as the runtime loads them
    sessions = [ort.InferenceSession(str(tmp_path / name), options, providers=["CPUExecutionProvider"])
                for name in ("served.onnx", "folded.onnx")]
    for feed in feeds:
        np.testing.assert_array_equal(sessions[1].run(None, feed)[0], sessions[0].run(None, feed)[0])
    # nothing to fold in fp32, and a folded graph has nothing left to fold
    assert fold_int8_biases(pipeline_run.path("onnx_dir") / "model.onnx", tmp_path / "fp32.onnx") == 0
    assert fold_int8_biases(tmp_path / "folded.onnx", tmp_path / "again.onnx") == 0


def test_a_non_default_window_overlap_plans_the_same_windows_in_training_evaluation_and_serving(pipeline_run,
                                                                                               tmp_path):
    """train.window_overlap travels with the model: the runtime reads it from the exported folder."""
    import shutil

    from pipeline.core.conll import Sentence
    from pipeline.modeling.data import make_examples
    from pipeline.modeling.model import HeadConfig, load_model, save_model

    assert json.loads((pipeline_run.path("onnx_dir") / "model_info.json").read_text())["window_overlap"] == \
        pipeline_run.params["train"]["window_overlap"]
    overlap = 0.25
    model, labels = load_model(pipeline_run.path("model_dir"))
    model.head_config = HeadConfig(**{**model.head_config.__dict__, "window_overlap": overlap})
    saved = tmp_path / "model"
    save_model(model, saved, labels)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (pipeline_run.path("model_dir") / name).is_file():
            shutil.copy2(pipeline_run.path("model_dir") / name, saved / name)
    reloaded, _ = load_model(saved)  # what evaluate and export read
    assert reloaded.head_config.window_overlap == overlap

    onnx = tmp_path / "onnx"
    shutil.copytree(pipeline_run.path("onnx_dir"), onnx)
    info = json.loads((onnx / "model_info.json").read_text())
    (onnx / "model_info.json").write_text(json.dumps({**info, "window_overlap": overlap}))
    runtime = NerRuntime(onnx)
    words = _words_with_pieces(runtime, 5 * runtime.max_tokens + 3)
    served = [(w.window.lo, w.window.hi, w.window.own_lo, w.window.own_hi) for w in runtime.encode([words])]

    tags = {t: i for i, t in enumerate(labels["tags"])}
    spans, pos = [], 0
    for w in words:
        spans.append((pos, pos + len(w)))
        pos += len(w) + 1
    sentence = Sentence("1", " ".join(words), spans, ["O"] * len(words))
    trained = make_examples([sentence], runtime.tokenizer, runtime.specials, tags,
                            reloaded.head_config.max_length, reloaded.head_config.window_overlap)
    assert [list(e.input_ids) for e in trained] == [list(w.input_ids) for w in runtime.encode([words])]
    assert [(e.own_lo, e.own_hi) for e in trained] == [(o_lo - lo, o_hi - lo) for lo, _, o_lo, o_hi in served]
    assert len(served) > 2 and served != [(w.lo, w.hi, w.own_lo, w.own_hi) for w in plan_windows(
        [len(p) for p in word_pieces(runtime.tokenizer, runtime.specials, words, runtime.max_tokens)],
        runtime.max_tokens, 0.5)]  # the plan really depends on the overlap
