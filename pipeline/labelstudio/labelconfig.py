"""Read the parts of a Label Studio labeling config that NER needs.

Parsed with the standard library on purpose: the serving runtime reads the
config that Label Studio sends with each request and must not depend on the
SDK (or torch).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import LabelConfigMismatch
from pipeline.core.textfile import decode_utf8

_LABEL_TAGS = {"Labels", "HyperTextLabels", "ParagraphLabels"}


@dataclass(frozen=True)
class LabelConfig:
    """Where NER regions go: the ``Labels`` control, its ``Text`` object and labels."""

    from_name: str
    to_name: str
    data_key: str
    labels: tuple[str, ...]


def parse_label_config(xml: str) -> LabelConfig:
    """Find the (single) span-labels control and the text object it labels."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise LabelConfigMismatch(f"label config is not valid XML: {exc}") from None
    controls = [el for el in root.iter() if el.tag in _LABEL_TAGS]
    if not controls:
        raise LabelConfigMismatch("label config has no <Labels> control for span labels")
    if len(controls) > 1:
        names = ", ".join(c.get("name", "?") for c in controls)
        raise LabelConfigMismatch(f"label config has several <Labels> controls ({names}); expected one")
    control = controls[0]
    from_name, to_name = control.get("name"), control.get("toName")
    if not from_name or not to_name:
        raise LabelConfigMismatch("the <Labels> control needs both 'name' and 'toName'")
    objects = {el.get("name"): el for el in root.iter() if el.get("name")}
    target = objects.get(to_name)
    if target is None:
        raise LabelConfigMismatch(f"<Labels name={from_name!r}> points to toName={to_name!r}, which is not defined")
    value = target.get("value", "")
    data_key = value[1:] if value.startswith("$") else value
    labels = tuple(el.get("value") for el in control if el.tag == "Label" and el.get("value"))
    if not labels:
        raise LabelConfigMismatch(f"<Labels name={from_name!r}> defines no <Label value=...>")
    return LabelConfig(from_name=from_name, to_name=to_name, data_key=data_key or "text", labels=labels)


def read_label_config_xml(path: str | Path) -> str:
    """The config file's text: UTF-8 (a BOM allowed), else a ``FileEncodingError`` naming the byte."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise LabelConfigMismatch(f"{path}: label config file not found") from None
    return decode_utf8(data, path)


def read_label_config(path: str | Path) -> LabelConfig:
    return parse_label_config(read_label_config_xml(path))


def check_labels(model_labels: list[str], config: LabelConfig) -> None:
    """Refuse to send labels that the project does not define, listing the difference."""
    missing = [label for label in model_labels if label not in config.labels]
    if missing:
        raise LabelConfigMismatch(
            f"model labels not in the project's label config: {missing}; "
            f"config '{config.from_name}' defines {list(config.labels)}"
        )
