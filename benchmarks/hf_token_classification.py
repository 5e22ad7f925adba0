"""The Hugging Face token-classification recipe our benchmarks compare against, written once."""

from __future__ import annotations

from typing import Any

from pipeline.core.conll import Sentence


def label_first_subtokens(tokenizer: Any, sentences: list[Sentence], tags: list[str], max_length: int) -> list[dict]:
    """Trainer rows: each word's first sub-token carries its tag, the rest and specials are -100."""
    tag_id = {t: i for i, t in enumerate(tags)}
    rows = []
    for s in sentences:
        enc = tokenizer(s.tokens, is_split_into_words=True, truncation=True, max_length=max_length)
        labels, previous = [], None
        for word in enc.word_ids():
            labels.append(-100 if word is None or word == previous else tag_id[s.tags[word]])
            previous = word
        rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return rows
