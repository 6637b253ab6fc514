"""Vocabulary: caption text <-> token ids.

Built from the training split only. Words seen fewer than ``min_count`` times map to ``<unk>``.
The order is deterministic (frequency, then alphabetical) so the same captions always give the
same ids, and a checkpoint carries its vocabulary as plain data.
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Iterable, Sequence

from captioner.io import atomic_write_text
from captioner.data.tokenizer import tokenize

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)  # <pad> is index 0: embeddings and the loss ignore it
# Every vocabulary starts with SPECIALS, so their ids are the same everywhere.
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIALS))


class Vocabulary:
    def __init__(self, words: Sequence[str]):
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}")
        self.itos = list(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("duplicate words in vocabulary")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (self.stoi[s] for s in SPECIALS)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> "Vocabulary":
        counts = Counter(tok for caption in captions for tok in tokenize(caption))
        kept = [w for w, n in counts.items() if n >= min_count and w not in SPECIALS]
        kept.sort(key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def encode(self, caption: str, max_length: int | None = None) -> list[int]:
        """<bos> w1 .. wn <eos>, with at most ``max_length`` words."""
        tokens = tokenize(caption)
        if max_length is not None:
            tokens = tokens[:max_length]
        # the text "<eos>" or "<pad>" in a caption is a word like any other, never the special token
        return [self.bos_id, *(self.unk_id if t in SPECIALS else self.stoi.get(t, self.unk_id) for t in tokens),
                self.eos_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first <eos>; <bos> and <pad> are dropped."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.bos_id, self.pad_id):
                continue
            words.append(self.itos[i])
        return " ".join(words)

    def to_dict(self) -> dict:
        return {"itos": list(self.itos)}

    @classmethod
    def from_dict(cls, data: dict) -> "Vocabulary":
        return cls(data["itos"])

    def save(self, path: str) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False))

    @classmethod
    def load(cls, path: str) -> "Vocabulary":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
