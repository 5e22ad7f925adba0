"""The reference engine: Label Studio's own converter (``label_studio_sdk.converter``).

Kept for users who want its exact token/tag output, and as the baseline that
our exact converter is tested and benchmarked against. Its known faults (all
shown in tests): NLTK's Treebank tokenizer makes a Chinese sentence one token,
overlapping spans are mangled without a word, a partly labelled word is tagged
whole, UTF-16 offsets are taken as they are, and tasks without annotations
become all-``O`` sentences. As a stage engine it reads the export with our
reader (gzip, encodings, nesting checked) and honours ``convert.overlap``,
``convert.annotations`` and ``convert.unknown_label`` on what it hands the
SDK's tagger; ``bad_tasks: skip`` and ``scheme: BIOES`` are refused.
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pipeline.core.atomic import atomic_dir, write_json
from pipeline.core.config import ConvertConfig
from pipeline.core.conll import Sentence, format_sentence
from pipeline.core.errors import ConversionError
from pipeline.labelstudio.convert import write_labels
from pipeline.labelstudio.labelconfig import LabelConfig, read_label_config, read_label_config_xml
from pipeline.labelstudio.report import ConvertReport, Span
from pipeline.labelstudio.sentences import SPLITS, split_of
from pipeline.labelstudio.spans import resolve_overlaps
from pipeline.labelstudio.tasks import choose_annotations, iter_export

log = logging.getLogger(__name__)


def convert_items(export_path: str | Path, label_config_path: str | Path, *, overlap: str | None = None,
                  annotations: str | None = None, unknown_label: str | None = None,
                  report: ConvertReport | None = None):
    """Yield ``(task_id, Sentence)`` as ``Converter.convert_to_conll2003`` tokenizes and tags.

    A policy left ``None`` behaves as the SDK does (every annotation its own sentence, overlapping spans and
    unknown labels passed through); given, it is applied to what the SDK hands its tagger, as the exact engine
    applies it.
    """
    from label_studio_sdk.converter import Converter
    from label_studio_sdk.converter.utils import create_tokens_and_tags
    from nltk.tokenize import TreebankWordTokenizer

    config = read_label_config(label_config_path)
    xml = read_label_config_xml(label_config_path)
    converter = Converter(config=xml, project_dir=None, download_resources=False)
    tokenizer = TreebankWordTokenizer()
    report = report if report is not None else ConvertReport()
    for task in iter_export(export_path):  # our reader: gzip, encodings and nesting checked, one line each
        if annotations is not None and task.get("annotations"):
            chosen = choose_annotations(task, annotations, report)
            task = {**task, "annotations": chosen} if chosen else task  # all cancelled: the SDK skips the task
        for item in converter.annotation_result_from_task(task) or []:
            text = item["input"].get(config.data_key)
            if not isinstance(text, str):
                raise ConversionError("task has no text", task_id=item.get("id"), field=f"data.{config.data_key}")
            outputs = [v for v in item["output"].values() if v and v[0]["type"].lower() == "labels"]
            spans = apply_policies(next(iter(outputs), None), item, text, config, overlap, unknown_label, report)
            tokens, tags = create_tokens_and_tags(text=text, spans=spans)
            offsets = list(tokenizer.span_tokenize(text))
            if [text[s:e] for s, e in offsets] != tokens:  # span_tokenize and tokenize agree on plain text
                offsets = _offsets_by_search(text, tokens)
            yield item["id"], Sentence(str(item["id"]), text, offsets, tags)


def apply_policies(values: list[dict[str, Any]] | None, item: dict[str, Any], text: str, config: LabelConfig,
                   overlap: str | None, unknown_label: str | None, report: ConvertReport) -> list[dict] | None:
    """The SDK's span values after ``convert.unknown_label`` and ``convert.overlap``, in the SDK's own form."""
    if not values:
        return values
    task_id, kept = item.get("id"), []
    for i, value in enumerate(values):
        labels = value.get("labels") or []
        unknown = [x for x in labels if x not in config.labels]
        if unknown and unknown_label == "error":
            raise ConversionError(f"label {unknown[0]!r} is not in the label config {list(config.labels)}",
                                  task_id=task_id, field=f"annotations[id={item.get('annotation_id')}].result[{i}]")
        if unknown and unknown_label == "ignore":
            report.counts["spans_dropped:unknown_label"] += 1
            continue
        kept.append(value)
    if overlap is None:
        return kept
    spans = [Span(int(v["start"]), int(v["end"]), v["labels"][0], item.get("annotation_id")) for v in kept]
    chosen = set(resolve_overlaps(spans, overlap, task_id, text, report))
    return [v for v, span in zip(kept, spans) if span in chosen]


def _offsets_by_search(text: str, tokens: list[str]) -> list[tuple[int, int]]:
    offsets, pos = [], 0
    for token in tokens:
        start = text.find(token, pos)
        start = pos if start < 0 else start
        offsets.append((start, start + len(token)))
        pos = start + len(token)
    return offsets


def run(export_path: str | Path, label_config_path: str | Path, conll_dir: str | Path, report_path: str | Path,
        *, policies: ConvertConfig | None = None) -> dict[str, Any]:
    """Same outputs as the exact engine (files, labels.json, report), produced by Label Studio's converter.

    Every ``convert.*`` policy (None: the defaults) is honoured, or refused when the SDK cannot follow it.
    """
    policies = ConvertConfig() if policies is None else policies
    if policies.scheme != "BIO":
        raise ConversionError(f"the ls-converter engine writes BIO only, not {policies.scheme}",
                              field="convert.scheme")
    if policies.bad_tasks != "error":
        raise ConversionError(f"the ls-converter engine stops at the first broken task; bad_tasks "
                              f"{policies.bad_tasks!r} needs the exact engine", field="convert.bad_tasks")
    config, split = read_label_config(label_config_path), policies.split
    policy_report = ConvertReport()
    counts: Counter = Counter()
    with atomic_dir(conll_dir) as out, ExitStack() as stack:
        files = {name: stack.enter_context((out / f"{name}.conll").open("w", encoding="utf-8")) for name in SPLITS}
        for task_id, sentence in convert_items(export_path, label_config_path, overlap=policies.overlap,
                                               annotations=policies.annotations,
                                               unknown_label=policies.unknown_label, report=policy_report):
            counts["sentences"] += 1
            name = split_of(sentence.text if split.key == "text" else str(task_id), split.dev, split.test)
            counts[f"split_{name}"] += 1
            files[name].write(format_sentence(sentence))
        stack.close()
        if not counts["sentences"]:
            raise ConversionError("the export holds no tasks")
        write_labels(out, config, policies.scheme)
    counts.update(policy_report.counts)
    report = {"engine": "ls-converter", "counts": dict(sorted(counts.items())), "spans": policy_report.spans,
              "note": "label_studio_sdk.converter tokenizes (NLTK Treebank) and tags; our policies choose the "
                      "annotations and spans it is given"}
    write_json(report_path, report)
    log.info("ls-converter engine: %d sentences", counts["sentences"])
    return report
