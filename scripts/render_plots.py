"""Render the key DVC plots of a run as one PNG, for the README and for readers without a browser.

`dvc plots show` writes an HTML page (Vega-Lite); a PNG in git shows the same
figures where HTML does not render (GitHub, a terminal image viewer, a review).
Reads the files the train and evaluate stages write (paths from the params file).

    .venv/bin/python scripts/render_plots.py                      # -> docs/plots.png
    .venv/bin/python scripts/render_plots.py --params pipelines/msra/params.yaml --out docs/plots-msra.png
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

from pipeline.core.atomic import atomic_open  # noqa: E402
from pipeline.core.params import load_params  # noqa: E402

log = logging.getLogger("render_plots")


def read_tsv(path: Path) -> tuple[list[float], list[float]]:
    with path.open(encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    return [float(r[0]) for r in rows[1:]], [float(r[1]) for r in rows[1:]]


def confusion_matrix(pairs: list[dict[str, str]]) -> tuple[list[str], list[list[int]]]:
    counts = Counter((p["actual"], p["predicted"]) for p in pairs)
    names = sorted({n for pair in counts for n in pair} - {"O"}) + ["O"]
    return names, [[counts[(a, p)] for p in names] for a in names]


def render(live: Path, per_type: Path, confusion: Path, out: Path) -> None:
    metrics = live / "plots" / "metrics"
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    (loss_ax, lr_ax, f1_ax), (type_ax, conf_ax, note_ax) = axes

    steps, loss = read_tsv(metrics / "train" / "loss.tsv")
    loss_ax.plot(steps, loss, lw=0.8)
    loss_ax.set(title="Training loss (CRF negative log-likelihood)", xlabel="optimizer step", yscale="log")

    for tsv in sorted((metrics / "train" / "lr").glob("*.tsv")):
        lr_ax.plot(*read_tsv(tsv), label=tsv.stem)
    lr_ax.set(title="Learning rate per parameter group", xlabel="optimizer step", yscale="log")
    lr_ax.legend()

    for name in ("f1", "precision", "recall"):
        if (metrics / "dev" / f"{name}.tsv").is_file():
            f1_ax.plot(*read_tsv(metrics / "dev" / f"{name}.tsv"), marker="o", label=f"dev {name}")
    f1_ax.set(title="Dev set, per epoch", xlabel="optimizer step", ylim=(0, 1))
    f1_ax.legend()

    rows = sorted(json.loads(per_type.read_text(encoding="utf-8")), key=lambda r: r["f1"])
    type_ax.barh([f"{r['type']} ({r['support']})" for r in rows], [r["f1"] for r in rows])
    type_ax.set(title="Test F1 per type (support)", xlim=(0, 1))

    names, matrix = confusion_matrix(json.loads(confusion.read_text(encoding="utf-8")))
    conf_ax.imshow(matrix, cmap="Blues")
    conf_ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
    conf_ax.set_yticks(range(len(names)), names)
    for i, row in enumerate(matrix):
        for j, n in enumerate(row):
            if n:
                conf_ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                             color="white" if n > max(map(max, matrix)) / 2 else "black")
    conf_ax.set(title="Test entities: actual (rows) vs predicted (O: none)")

    note_ax.axis("off")
    summary = json.loads((live / "metrics.json").read_text()) if (live / "metrics.json").is_file() else {}
    lines = [f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in _flat(summary).items()]
    note_ax.text(0, 1, "\n".join(lines[:18]), va="top", family="monospace", fontsize=9)
    note_ax.set(title=str(live / "metrics.json"))

    fig.tight_layout()
    with atomic_open(out, "wb") as fh:
        fig.savefig(fh, format="png", dpi=80)
    plt.close(fig)


def _flat(tree: dict, prefix: str = "") -> dict:
    out: dict = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=Path("docs/plots.png"))
    args = parser.parse_args()
    paths = load_params(args.params)["paths"]
    render(Path(paths["train_live"]), Path(paths["eval_per_type_plot"]), Path(paths["eval_confusion_plot"]),
           args.out)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
