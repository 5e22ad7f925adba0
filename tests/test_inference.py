"""The shared ONNX runtime: batch-independent results, long texts, offsets, and no torch."""

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.encoding import plan_windows
from pipeline.inference import NerRuntime

pytestmark = pytest.mark.slow


def test_windows_cover_every_word_once_and_respect_the_budget():
    counts = [1, 3, 2, 5, 1, 1, 4, 2, 2, 3, 1, 1, 6, 2] * 5
    windows = plan_windows(counts, max_tokens=12)
    assert len(windows) > 1
    owned = []
    for w in windows:
        assert sum(counts[w.lo:w.hi]) <= 12
        assert w.lo <= w.own_lo < w.own_hi <= w.hi
        owned.extend(range(w.own_lo, w.own_hi))
    assert owned == list(range(len(counts)))
    assert plan_windows([3, 4], max_tokens=12)[0].own_hi == 2


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
    from pipeline.words import split_words

    emissions = runtime.word_emissions([[text[s:e] for s, e in split_words(text)]])[0]
    assert np.all(np.abs(emissions).sum(axis=1) > 0)  # every word got an emission from some window


def test_runtime_runs_without_torch(pipeline_run):
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "from pipeline.inference import NerRuntime\n"
        f"r = NerRuntime({str(pipeline_run.path('onnx_dir'))!r})\n"
        "p = r.predict(['Obama in Paris', '北京'])\n"
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
