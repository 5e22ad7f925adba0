"""Runtime entities as Label Studio prediction regions: what ``predict``, ``serve/`` and push send.

Each region is ``{from_name, to_name, type: "labels", value: {start, end, text, labels}, score}`` with the
names taken from the project's label config, never hard-coded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.labelstudio.labelconfig import LabelConfig

if TYPE_CHECKING:  # the runtime hands its predictions in; this layer does not depend on it
    from pipeline.runtime.inference import TextPrediction


def to_ls_prediction(pred: TextPrediction, config: LabelConfig, model_version: str,
                     uncertainty: str = "sequence") -> dict[str, Any]:
    """One Label Studio prediction; region ids are stable so re-runs produce the same file.

    Its ``score`` (what Label Studio sorts tasks by) is the confidence named by ``uncertainty``: ``sequence``,
    ``min_entity`` or ``entropy`` (see ``pipeline.runtime.uncertainty``).
    """
    result = [{
        "id": f"r{i}-{e.start}-{e.end}",
        "from_name": config.from_name,
        "to_name": config.to_name,
        "type": "labels",
        "value": {"start": e.start, "end": e.end, "text": e.text, "labels": [e.label]},
        "score": e.score,
    } for i, e in enumerate(pred.entities)]
    return {"model_version": model_version, "score": pred.confidence[uncertainty], "result": result}
