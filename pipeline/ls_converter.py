"""The reference engine: Label Studio's own converter (``label_studio_sdk.converter``).

Kept for users who want its exact token/tag output, and as the baseline that
our exact converter is tested and benchmarked against. Its known faults (all
shown in tests): NLTK's Treebank tokenizer makes a Chinese sentence one token,
overlapping spans are mangled without a word, a partly labelled word is tagged
whole, UTF-16 offsets are taken as they are, every non-cancelled annotation
becomes its own sentence, and tasks without annotations become all-``O``
sentences. Nothing is reported.
"""

from __future__ import annotations

import gzip
import logging
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_dir, write_json
from pipeline.conll import Sentence, format_sentence
from pipeline.convert import SPLITS, split_of, write_labels
from pipeline.errors import ConversionError, FileEncodingError
from pipeline.jsonstream import iter_json_array, open_export
from pipeline.labelconfig import read_label_config, read_label_config_xml

log = logging.getLogger(__name__)


def convert_items(export_path: str | Path, label_config_path: str | Path):
    """Yield ``(task_id, Sentence)`` exactly as ``Converter.convert_to_conll2003`` tokenizes and tags."""
    from label_studio_sdk.converter import Converter
    from label_studio_sdk.converter.utils import create_tokens_and_tags
    from nltk.tokenize import TreebankWordTokenizer

    config = read_label_config(label_config_path)
    xml = read_label_config_xml(label_config_path)
    check_plain_json(Path(export_path))
    converter = Converter(config=xml, project_dir=None, download_resources=False)
    tokenizer = TreebankWordTokenizer()
    for item in _sdk_items(converter, export_path):
        text = item["input"].get(config.data_key)
        if not isinstance(text, str):
            raise ConversionError("task has no text", task_id=item.get("id"), field=f"data.{config.data_key}")
        outputs = [v for v in item["output"].values() if v and v[0]["type"].lower() == "labels"]
        tokens, tags = create_tokens_and_tags(text=text, spans=next(iter(outputs), None))
        offsets = list(tokenizer.span_tokenize(text))
        if [text[s:e] for s, e in offsets] != tokens:  # span_tokenize and tokenize agree on plain text
            offsets = _offsets_by_search(text, tokens)
        yield item["id"], Sentence(str(item["id"]), text, offsets, tags)


def check_plain_json(path: Path) -> None:
    """Refuse what the SDK's converter cannot read before it fails inside (or, on a task nested
    100k levels deep, runs out of memory): read the file once with our streaming reader."""
    if not path.is_file():
        raise ConversionError(f"{path}: export file not found")
    with open_export(path) as fh:
        if isinstance(fh, gzip.GzipFile):
            raise FileEncodingError(f"{path}: is gzip-compressed; the ls-converter engine reads plain JSON "
                                    "only: decompress it (gunzip) or use the exact engine")
    for _ in iter_json_array(path):
        pass


def _sdk_items(converter: Any, export_path: str | Path):
    """The SDK converter's items; bytes it cannot decode or nest become one-line errors."""
    try:
        yield from converter.iter_from_json_file(str(export_path))
    except UnicodeDecodeError as exc:
        raise FileEncodingError(f"{export_path}: is not UTF-8 ({exc.reason} near byte {exc.start}); Label "
                                "Studio writes UTF-8") from None
    except RecursionError:
        raise ConversionError(f"{export_path}: an item nests lists or objects too deeply to decode") from None


def _offsets_by_search(text: str, tokens: list[str]) -> list[tuple[int, int]]:
    offsets, pos = [], 0
    for token in tokens:
        start = text.find(token, pos)
        start = pos if start < 0 else start
        offsets.append((start, start + len(token)))
        pos = start + len(token)
    return offsets


def run(export_path: str | Path, label_config_path: str | Path, conll_dir: str | Path, report_path: str | Path,
        *, scheme: str = "BIO", split_key: str = "text", dev: float = 0.1, test: float = 0.1,
        **_ignored: Any) -> dict[str, Any]:
    """Same outputs as the exact engine (files, labels.json, report), produced by Label Studio's converter."""
    if scheme != "BIO":
        raise ConversionError(f"the ls-converter engine writes BIO only, not {scheme}", field="convert.scheme")
    config = read_label_config(label_config_path)
    counts: Counter = Counter()
    with atomic_dir(conll_dir) as out, ExitStack() as stack:
        files = {name: stack.enter_context((out / f"{name}.conll").open("w", encoding="utf-8")) for name in SPLITS}
        for task_id, sentence in convert_items(export_path, label_config_path):
            counts["sentences"] += 1
            name = split_of(sentence.text if split_key == "text" else str(task_id), dev, test)
            counts[f"split_{name}"] += 1
            files[name].write(format_sentence(sentence))
        stack.close()
        if not counts["sentences"]:
            raise ConversionError("the export holds no tasks")
        write_labels(out, config, scheme)
    report = {"engine": "ls-converter", "counts": dict(counts),
              "note": "label_studio_sdk.converter reports no dropped or changed spans"}
    write_json(report_path, report)
    log.info("ls-converter engine: %d sentences", counts["sentences"])
    return report
