"""Words -> sub-token ids, and windows for sequences longer than the encoder.

Torch-free on purpose: training, ONNX inference and the HTTP service all build
encoder inputs here, so a word is encoded the same way everywhere. Each word
is represented by its first sub-token (that position carries the word's
emission); a word the tokenizer turns into nothing (a lone combining mark, a
control character) becomes ``[UNK]`` so that every word gets a tag.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from pipeline.core.errors import ModelLoadError

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class SpecialIds:
    cls: int
    sep: int
    pad: int
    unk: int


def load_tokenizer(model_dir: str | Path) -> tuple[Tokenizer, SpecialIds]:
    """Load ``tokenizer.json`` with padding and truncation off (we window instead)."""
    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} not found; a model folder needs a fast tokenizer file")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer, special_ids(tokenizer)


def special_ids(tokenizer: Tokenizer) -> SpecialIds:
    ids = {name: tokenizer.token_to_id(tok) for name, tok in
           (("cls", "[CLS]"), ("sep", "[SEP]"), ("pad", "[PAD]"), ("unk", "[UNK]"))}
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ModelLoadError(f"tokenizer lacks BERT special tokens: {missing}")
    return SpecialIds(**ids)


def word_pieces(tokenizer: Tokenizer, specials: SpecialIds, words: list[str],
                max_pieces: int) -> list[list[int]]:
    """Sub-token ids of each word, at most ``max_pieces`` per word, never empty."""
    return texts_word_pieces(tokenizer, specials, [words], max_pieces)[0]


def texts_word_pieces(tokenizer: Tokenizer, specials: SpecialIds, texts: list[list[str]],
                      max_pieces: int) -> list[list[list[int]]]:
    """:func:`word_pieces` of each text (a list of words), all in one ``encode_batch``: the tokenizer's Rust side
    encodes them on its own threads and lets go of the GIL meanwhile, where ``encode`` holds it (58 ms for a
    100k-character text on a Zen 4, during which no other thread of the service ran). The same ids as ``encode``
    of each text alone."""
    encodings = iter(tokenizer.encode_batch([words for words in texts if words], is_pretokenized=True,
                                            add_special_tokens=False))
    out = []
    for words in texts:
        pieces: list[list[int]] = [[] for _ in words]
        if words:
            enc = next(encodings)
            for token_id, word_id in zip(enc.ids, enc.word_ids):
                if word_id is not None and len(pieces[word_id]) < max_pieces:
                    pieces[word_id].append(token_id)
        for p in pieces:
            if not p:
                p.append(specials.unk)
        out.append(pieces)
    return out


@dataclass(frozen=True)
class Window:
    """Words ``lo..hi`` fed to the encoder together; ``own_lo..own_hi`` take their emissions from it."""

    lo: int
    hi: int
    own_lo: int
    own_hi: int


#: Share of a window's sub-tokens repeated in the next one: ``train.window_overlap``'s default, saved with the
#: model (``head_config.json``, ``model_info.json``) so training, evaluation, export and serving plan alike.
DEFAULT_WINDOW_OVERLAP = 0.5


def plan_windows(piece_counts: list[int], max_tokens: int, overlap: float) -> list[Window]:
    """Cover all words with windows of at most ``max_tokens`` sub-tokens.

    Consecutive windows share about ``overlap`` of their sub-tokens; each word
    takes its emission from the window where it is most central, so it sees
    context on both sides. ``overlap=0`` gives disjoint chunks.
    """
    n = len(piece_counts)
    if n == 0:
        return []
    spans: list[tuple[int, int]] = []
    lo = 0
    while True:
        hi, used = lo, 0
        while hi < n and (hi == lo or used + piece_counts[hi] <= max_tokens):
            used += piece_counts[hi]
            hi += 1
        spans.append((lo, hi))
        if hi >= n:
            break
        keep = int(max_tokens * overlap)
        new_lo, tail = hi, 0
        while new_lo - 1 > lo and tail + piece_counts[new_lo - 1] <= keep:
            new_lo -= 1
            tail += piece_counts[new_lo]
        lo = new_lo
    if len(spans) == 1:
        return [Window(0, n, 0, n)]
    owner = [0] * n
    best = [-1] * n
    for k, (lo, hi) in enumerate(spans):
        for w in range(lo, hi):
            centrality = min(w - lo, hi - 1 - w)
            if centrality > best[w]:
                best[w], owner[w] = centrality, k
    windows = []
    for k, (lo, hi) in enumerate(spans):
        owned = [w for w in range(lo, hi) if owner[w] == k]
        if owned:
            windows.append(Window(lo, hi, owned[0], owned[-1] + 1))
    return windows


def window_inputs(pieces: list[list[int]], window: Window, specials: SpecialIds) -> tuple[list[int], list[int]]:
    """``[CLS] pieces [SEP]`` for a window, and the position of each word's first piece."""
    ids = [specials.cls]
    first = []
    for word in pieces[window.lo:window.hi]:
        first.append(len(ids))
        ids.extend(word)
    ids.append(specials.sep)
    return ids, first
