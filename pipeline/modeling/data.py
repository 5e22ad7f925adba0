"""Training examples: sentences -> encoder inputs, and length-bucketed batches.

Bucketing is where training speed comes from here (padding drops from ~44% to
~11%); the batch order is shuffled afterwards so that tiny last batches do not
cluster and each epoch still sees a new order.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from pipeline.core.conll import Sentence
from pipeline.core.encoding import SpecialIds, plan_windows, window_inputs, word_pieces
from pipeline.core.tags import close_window_edges


@dataclass(frozen=True)
class Example:
    """One encoder window of a sentence; words ``own_lo..own_hi`` of it are the ones it predicts."""

    sentence_index: int
    input_ids: list[int]
    word_index: list[int]
    tags: list[int]
    own_lo: int = 0
    own_hi: int | None = None


def make_examples(sentences: Sequence[Sentence], tokenizer: Tokenizer, specials: SpecialIds,
                  tag_to_id: dict[str, int], max_length: int, overlap: float,
                  scheme: str = "BIO") -> list[Example]:
    """Encode sentences; longer ones become overlapping windows instead of being truncated.

    Windows are planned exactly as the inference runtime plans them, so dev
    and test scores measure what ``predict`` will do. An entity cut by a
    window edge is re-tagged to be well formed inside that window.
    """
    examples = []
    budget = max_length - 2
    for i, sent in enumerate(sentences):
        pieces = word_pieces(tokenizer, specials, sent.tokens, budget)
        for window in plan_windows([len(p) for p in pieces], budget, overlap=overlap):
            ids, first = window_inputs(pieces, window, specials)
            tags = close_window_edges(sent.tags[window.lo:window.hi], scheme, cut_before=window.lo > 0,
                                      cut_after=window.hi < len(pieces))
            examples.append(Example(i, ids, first, [tag_to_id[t] for t in tags],
                                    window.own_lo - window.lo, window.own_hi - window.lo))
    return examples


def bucket_batches(examples: Sequence[Example], batch_size: int, rng: random.Random | None,
                   bucket_batches: int = 50) -> list[list[int]]:
    """Indices of batches of similar length; shuffled when ``rng`` is given."""
    order = list(range(len(examples)))
    if rng is not None:
        rng.shuffle(order)
    batches = []
    span = batch_size * bucket_batches
    for lo in range(0, len(order), span):
        chunk = sorted(order[lo:lo + span], key=lambda i: len(examples[i].input_ids))
        batches.extend(chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size))
    if rng is not None:
        rng.shuffle(batches)
    return batches


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its own longest example (dynamic padding)."""
    n = len(examples)
    seq = max(len(e.input_ids) for e in examples)
    words = max(len(e.word_index) for e in examples)
    input_ids = torch.full((n, seq), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, seq), dtype=torch.long)
    word_index = torch.zeros((n, words), dtype=torch.long)
    word_mask = torch.zeros((n, words), dtype=torch.long)
    tags = torch.zeros((n, words), dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[i, :len(e.input_ids)] = 1
        word_index[i, :len(e.word_index)] = torch.tensor(e.word_index)
        word_mask[i, :len(e.word_index)] = 1
        tags[i, :len(e.tags)] = torch.tensor(e.tags)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "word_index": word_index,
            "word_mask": word_mask, "tags": tags}
