"""The bytes a Label Studio file may hold: UTF-8 (a byte-order mark allowed), also gzip-compressed.

Label Studio writes its JSON export and the label config as UTF-8 (its
"Export" button and the SDK alike). A file in another encoding (UTF-16 from
a Windows editor, Latin-1, a zip archive) is refused in one line naming the
file and the byte at fault: guessing an encoding would move every offset.
A gzip file (``export.json.gz``, or a download saved without ``curl
--compressed``) is read as the JSON inside it.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from pipeline.core.errors import FileEncodingError

GZIP_MAGIC = b"\x1f\x8b"
_RECODE = "re-encode it as UTF-8 (e.g. iconv -f {} -t UTF-8)"


def refusal(head: bytes) -> str | None:
    """Why a file starting with ``head`` (its first bytes) is not UTF-8 text, or None."""
    if head.startswith(b"PK\x03\x04"):
        return "is a zip archive, not a JSON file: unzip it and use the file inside"
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32LE"), (codecs.BOM_UTF32_BE, "UTF-32BE"),
                      (codecs.BOM_UTF16_LE, "UTF-16LE"), (codecs.BOM_UTF16_BE, "UTF-16BE")):
        if head.startswith(bom):
            return f"is {name} (byte-order mark at byte 0), not UTF-8 as Label Studio writes: " + _RECODE.format(name)
    nul = head.find(b"\x00")
    if nul != -1:
        return (f"has a NUL byte at byte {nul}: UTF-16 or UTF-32 without a byte-order mark? Label Studio writes "
                "UTF-8: " + _RECODE.format("UTF-16"))
    return None


def not_utf8(exc: UnicodeDecodeError, offset: int) -> str:
    """The message for bytes that do not decode: which byte, and what to do."""
    bad = exc.object[exc.start:exc.start + 1].hex().upper()
    return (f"is not UTF-8: byte {offset} (0x{bad}) does not decode ({exc.reason}); Label Studio writes UTF-8: "
            + _RECODE.format("LATIN1"))


def decode_utf8(data: bytes, path: str | Path) -> str:
    """A whole small file's text (UTF-8, a leading BOM dropped), or ``FileEncodingError``."""
    reason = refusal(data[:64])
    if reason is not None:
        raise FileEncodingError(f"{path}: {reason}")
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileEncodingError(f"{path}: {not_utf8(exc, bom + exc.start)}") from None
