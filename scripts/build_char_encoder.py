"""Write a small character-level BERT folder (config + tokenizer, no weights) for a Chinese corpus.

No Chinese BERT weights can be installed here (nothing loads from a model hub and
PyPI ships none), so the Chinese pipeline trains its encoder from a config
(``train.pretrained: false``). This writes the folder that config and tokenizer live
in, in the same layout as ``bert-base-chinese``: one vocabulary entry per character,
seen in the export's texts, plus ``##``-continuations for the non-CJK characters that
the BERT basic tokenizer keeps together (digits, Latin letters). With
``bert-base-chinese`` on disk, point ``paths.encoder`` at it instead and set
``train.pretrained: true``.

    python -m scripts.build_char_encoder --export data/msra/export.json --out models/msra/encoder
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path

from pipeline.core.interpreter import ensure_project_interpreter  # stdlib only: runs before any dependency

if __name__ == "__main__":
    ensure_project_interpreter()

from transformers import BertConfig, BertTokenizerFast  # noqa: E402

from pipeline.core.atomic import atomic_dir  # noqa: E402

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
log = logging.getLogger("build_char_encoder")


def is_cjk(char: str) -> bool:
    """The ranges BERT's basic tokenizer splits into one token per character."""
    cp = ord(char)
    return any(lo <= cp <= hi for lo, hi in (
        (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def character_vocab(texts: list[str], min_count: int = 1) -> list[str]:
    """Special tokens, then characters by frequency, then ``##`` forms of the non-CJK ones."""
    counts = Counter(c for text in texts for c in text if not c.isspace())
    chars = [c for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count]
    return SPECIAL_TOKENS + chars + [f"##{c}" for c in chars if not is_cjk(c)]


def build_encoder(texts: list[str], out_dir: Path, hidden: int, layers: int, heads: int,
                  min_count: int = 1) -> dict:
    vocab = character_vocab(texts, min_count)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=512)
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=False,
                                  strip_accents=False, tokenize_chinese_chars=True)
    with atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(str(tmp))
        (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        config.to_json_file(str(tmp / "config.json"))
    return {"vocab_size": len(vocab), "hidden": hidden, "layers": layers, "heads": heads}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, required=True, help="Label Studio JSON export whose texts set the vocab")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--min-count", type=int, default=1)
    args = parser.parse_args()
    tasks = json.loads(args.export.read_text(encoding="utf-8"))
    texts = [task["data"]["text"] for task in tasks]
    info = build_encoder(texts, args.out, args.hidden, args.layers, args.heads, args.min_count)
    log.info("wrote %s: %s", args.out, info)


if __name__ == "__main__":
    main()
