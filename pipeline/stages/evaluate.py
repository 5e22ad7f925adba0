"""The evaluate stage: models/best on the test split into metrics, plots and reports/errors.jsonl.

``main()`` reads its params once and calls the layers with plain values.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.core.atomic import atomic_open, write_json
from pipeline.core.config import EvaluateConfig
from pipeline.core.conll import read_conll
from pipeline.core.metrics import entity_errors, score
from pipeline.modeling.evaluate import predict_sentences

log = logging.getLogger(__name__)


def main(params: dict[str, Any], data: str | Path | None = None) -> None:
    """Score the model on ``data`` (a CoNLL file; default: the test split) and write metrics, plots, errors."""
    paths, conf = params["paths"], EvaluateConfig.from_params(params)
    sentences = list(read_conll(Path(data) if data else Path(paths["conll_dir"]) / "test.conll"))
    pred, labels = predict_sentences(paths["model_dir"], sentences, conf.batch_size)
    metrics = score([s.tags for s in sentences], pred, labels["scheme"])
    confusion, errors = entity_errors(sentences, pred)
    write_json(paths["eval_metrics"], {"test": metrics})
    rows = [{"type": k, "f1": round(v["f1"], 4), "strict_f1": round(metrics["strict"]["per_type"].get(k, {})
                                                                      .get("f1", 0.0), 4), "support": v["support"]}
            for k, v in metrics["per_type"].items()]
    write_json(paths["eval_per_type_plot"], rows)
    write_json(paths["eval_confusion_plot"], confusion, indent=None)
    with atomic_open(paths["eval_errors"]) as fh:
        for error in errors:
            fh.write(json.dumps(error, ensure_ascii=False) + "\n")
    kinds = Counter(e["kind"] for e in errors)
    log.info("%d wrong or missed spans (%s) listed in %s", len(errors),
             ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())), paths["eval_errors"])
    log.info("test F1 %.4f (strict %.4f, P %.4f, R %.4f) on %d sentences", metrics["f1"], metrics["strict_f1"],
             metrics["precision"], metrics["recall"], metrics["sentences"])
