"""What a study found: a Markdown table and JSON of its trials, and Optuna's plots, each written atomically.

The table lists every trial (number, state, params, dev F1 per epoch, best dev F1, experiment), marks the best
and gives the one command that applies it (``dvc exp apply <experiment>``). The plots (optimization history,
parameter importances, parallel coordinates, dev F1 per epoch) come from ``optuna.visualization.matplotlib``.
Torch-free.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.core.atomic import atomic_open, write_json

log = logging.getLogger(__name__)

PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values")
#: Axis labels in the study's terms where Optuna's are generic (x, y; None keeps Optuna's).
AXES = {"optimization_history": ("trial", "best dev F1"), "intermediate_values": ("epoch", "best dev F1 so far")}


def best_trial(study: Any) -> Any | None:
    complete = [t for t in study.trials if t.state.name == "COMPLETE" and t.value is not None]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def apply_command(trial: Any) -> str:
    return f"dvc exp apply {trial.user_attrs['experiment']}"


def trial_rows(study: Any) -> list[dict[str, Any]]:
    best = best_trial(study)
    rows = []
    for t in study.trials:
        minutes = (t.datetime_complete - t.datetime_start).total_seconds() / 60 if t.datetime_complete else None
        rows.append({
            "number": t.number, "state": t.state.name, "best": best is not None and t.number == best.number,
            "params": t.params, "dev_f1": t.value if t.state.name == "COMPLETE" else None,  # not a pruned one's last
            "dev_f1_per_epoch": t.user_attrs.get("dev_f1_per_epoch",  # studies before it was kept: what they reported
                                                 [t.intermediate_values[k] for k in sorted(t.intermediate_values)]),
            "experiment": t.user_attrs.get("experiment") if t.state.name == "COMPLETE" else None,
            "commit": t.user_attrs.get("commit"), "minutes": round(minutes, 2) if minutes is not None else None,
            "error": t.user_attrs.get("error")})
    return rows


def summary(study: Any, conf: Any) -> dict[str, Any]:
    best = best_trial(study)
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return {"study": conf.study, "objective": "best dev F1 of the train stage", "direction": "maximize",
            "sampler": conf.sampler, "pruner": conf.pruner, "states": states,
            "best": None if best is None else {"number": best.number, "dev_f1": best.value, "params": best.params,
                                               "experiment": best.user_attrs.get("experiment")},
            "apply": None if best is None else apply_command(best), "trials": trial_rows(study)}


def write_report(study: Any, conf: Any, markdown: str | Path, json_path: str | Path) -> dict[str, Any]:
    """``reports/tune.md`` and ``reports/tune.json``; returns the summary."""
    data = summary(study, conf)
    write_json(json_path, data)
    with atomic_open(markdown) as fh:
        fh.write(render_markdown(data, list(conf.space)))
    return data


def render_markdown(data: dict[str, Any], keys: list[str]) -> str:
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(data["states"].items()))
    lines = [f"# Tuning study `{data['study']}`", "",
             f"Objective: {data['objective']} ({data['direction']}); sampler `{data['sampler']}`, pruner "
             f"`{data['pruner']}`; {len(data['trials'])} trials: {counts or 'none yet'}.", ""]
    best = data["best"]
    if best:
        lines += [f"**Best: trial {best['number']}** (`{best['experiment']}`), dev F1 {best['dev_f1']:.4f}. "
                  "Apply its params and trained model to the workspace (then `dvc repro` evaluates, exports and "
                  "predicts with it):", "", "```bash", data["apply"], "```", ""]
    else:
        lines += ["No trial has finished yet.", ""]
    keys = keys + sorted({k for row in data["trials"] for k in row["params"]} - set(keys))
    lines += ["| trial | state | best dev F1 | dev F1 per epoch | " + " | ".join(keys) + " | min | experiment |",
              "|" + " --- |" * (len(keys) + 6)]
    for row in data["trials"]:
        number = f"**{row['number']} (best)**" if row["best"] else str(row["number"])
        value = "—" if row["dev_f1"] is None else f"{row['dev_f1']:.4f}"
        lines.append(" | ".join([
            f"| {number}", row["state"].lower(), f"**{value}**" if row["best"] else value,
            " ".join(f"{v:.3f}" for v in row["dev_f1_per_epoch"]) or "—",
            *(_cell(row["params"].get(k)) for k in keys),
            "—" if row["minutes"] is None else f"{row['minutes']:.1f}",
            f"`{row['experiment']}`" if row["experiment"] else "—"]) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_plots(study: Any, folder: str | Path) -> list[Path]:
    """Optuna's matplotlib plots as PNGs in ``folder``; a plot the trials cannot support yet is skipped, said."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as oplt

    written = []
    for name in PLOTS:
        try:
            axes = getattr(oplt, f"plot_{name}")(study)
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as exc:
            log.info("plot %s skipped: %s", name, exc)
            continue
        figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
        for axis, label in zip(("x", "y"), AXES.get(name, ())):
            if label:
                getattr(figure.axes[0], f"set_{axis}label")(label)
        figure.set_size_inches(max(figure.get_size_inches()[0], 9), 5.5)
        figure.tight_layout()
        path = Path(folder) / f"{name}.png"
        with atomic_open(path, "wb") as fh:
            figure.savefig(fh, format="png", dpi=100)
        plt.close(figure)
        written.append(path)
    return written
