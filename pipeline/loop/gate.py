"""The promotion gate: a candidate replaces the served model only if it is better on the same held-out split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"decision": "promoted" if self.promote else "rejected", "reason": self.reason}


def decide(candidate: dict[str, float], served: dict[str, float] | None, *, min_gain: float,
           max_test_drop: float) -> Decision:
    """Promote iff dev F1 gains more than ``min_gain`` points and test F1 drops by at most ``max_test_drop``.

    Both score dicts hold ``dev_f1`` and ``test_f1`` in [0, 1], measured on the same split by the same runtime
    (``pipeline.loop.scoring``). A tie keeps the served model. With nothing served yet, the candidate wins.
    """
    if served is None:
        return Decision(True, f"first model: dev F1 {_pt(candidate['dev_f1'])}, test F1 {_pt(candidate['test_f1'])}")
    dev_gain = 100 * (candidate["dev_f1"] - served["dev_f1"])
    test_drop = 100 * (served["test_f1"] - candidate["test_f1"])
    figures = (f"dev F1 {_pt(candidate['dev_f1'])} vs {_pt(served['dev_f1'])} served ({dev_gain:+.2f} points), "
               f"test F1 {_pt(candidate['test_f1'])} vs {_pt(served['test_f1'])} ({-test_drop:+.2f} points)")
    if dev_gain <= min_gain:
        return Decision(False, f"{figures}: dev gain not above loop.min_gain {min_gain:g}")
    if test_drop > max_test_drop:
        return Decision(False, f"{figures}: test drop above loop.max_test_drop {max_test_drop:g}")
    return Decision(True, figures)


def _pt(f1: float) -> str:
    return f"{100 * f1:.2f}"
