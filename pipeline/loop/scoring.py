"""Dev and test F1 of an exported model folder on a CoNLL split, through the serving runtime.

The gate compares the candidate and the served model with this one function on the same files, so both are
measured the way they would serve (ONNX, the windows saved with each model), never one in torch and one in ORT.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.conll import read_conll
from pipeline.core.errors import PipelineError
from pipeline.core.metrics import score
from pipeline.runtime.inference import NerRuntime


def score_model(model_dir: str | Path, conll_dir: str | Path, *, threads: int = 0) -> dict[str, float]:
    """``{"dev_f1", "test_f1", "dev_sentences", "test_sentences"}`` of the model on ``conll_dir``'s splits."""
    conll_dir = Path(conll_dir)
    scheme = json.loads((conll_dir / "labels.json").read_text(encoding="utf-8"))["scheme"]
    runtime = NerRuntime(model_dir, threads=threads)
    out: dict[str, float] = {}
    for split in ("dev", "test"):
        sentences = list(read_conll(conll_dir / f"{split}.conll"))
        if not sentences:
            raise PipelineError(f"{conll_dir / f'{split}.conll'} holds no sentences: nothing to compare models on")
        pred = runtime.tag_words([s.tokens for s in sentences])
        out[f"{split}_f1"] = score([s.tags for s in sentences], pred, scheme)["f1"]
        out[f"{split}_sentences"] = len(sentences)
    return out
