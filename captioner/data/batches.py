"""Training batches, the order of an epoch a function of (seed, epoch) alone so a resumed run can
skip to the exact batch it stopped at: every (image, caption) pair for objectives that learn from
one caption at a time (cross-entropy), every image for those that read an image's references
(self-critical training)."""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch

from captioner.data import ImageRecord
from captioner.data.vocab import BOS_ID, PAD_ID, Vocabulary


class Batch(NamedTuple):
    """A training batch: features [B, D] (or images, when the encoder is fine-tuned), tokens
    [B, T] (<bos> w1 .. wn <eos>, padded), each row's index into the split's records and, for
    objectives that draw samples, each row's random seed (a function of the run's seed, the epoch
    and the image: never of the process or of where the row sits in the batch)."""

    features: torch.Tensor
    tokens: torch.Tensor
    rows: torch.Tensor
    seeds: Optional[torch.Tensor] = None


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of ``n`` training examples in ``epoch``: a function of (seed, epoch)
    alone, so a resumed run can skip to the exact batch it stopped at."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


class CaptionBatches:
    """Every (image, caption) pair as a training example, shuffled per epoch by a seeded generator.

    The order of an epoch is a function of (seed, epoch) alone, so a resumed run can skip to the
    exact batch it stopped at. Each batch is trimmed to its longest caption.
    """

    def __init__(self, features: np.ndarray, records: Sequence[ImageRecord], vocab: Vocabulary,
                 max_length: int, batch_size: int, seed: int = 0):
        count = sum(len(record.captions) for record in records)
        if not count:
            raise ValueError("the training split has no captions")
        # Filled in place (no list of lists): COCO has 616k captions, and memory should be the tensor.
        tokens = np.full((count, max_length + 2), PAD_ID, dtype=np.int64)  # + <bos>, <eos>
        rows = np.empty(count, dtype=np.int64)
        i = 0
        for row, record in enumerate(records):
            for caption in record.captions:
                ids = vocab.encode(caption, max_length)
                tokens[i, : len(ids)] = ids
                rows[i] = row
                i += 1
        self.lengths = torch.from_numpy((tokens != PAD_ID).sum(axis=1))
        self.tokens = torch.from_numpy(tokens[:, : int(self.lengths.max())].copy())
        self.rows = torch.from_numpy(rows)
        self.features = features
        self.batch_size, self.seed = batch_size, seed

    @classmethod
    def of_run(cls, features: np.ndarray, context, cfg) -> "CaptionBatches":
        """A run's batches: its training split (``context``: an ``ObjectiveContext``) in batches of
        ``train.batch_size`` ordered by ``train.seed``, captions cut at ``data.max_length``."""
        return cls(features, context.records, context.vocab, cfg.data.max_length, cfg.train.batch_size,
                   seed=cfg.train.seed)

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        for rows, tokens in self.epoch_rows(epoch, start):
            yield Batch(torch.from_numpy(np.asarray(self.features[rows.numpy()], dtype=np.float32)), tokens, rows)

    def epoch_rows(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch`` from ``start`` as (image rows of the records, tokens)."""
        order = epoch_order(len(self.rows), self.seed, epoch)
        for b in range(start, len(self)):
            pairs = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.rows[pairs], self.tokens[pairs, : int(self.lengths[pairs].max())]


class ImageBatches:
    """Every training image once per epoch, shuffled by a seeded generator (the order a function of
    (seed, epoch) alone, for exact resume), for objectives that read an image's references rather
    than one caption: each batch carries the rows' record indices and their random seeds."""

    def __init__(self, features: np.ndarray, batch_size: int, seed: int = 0):
        self.features, self.batch_size, self.seed = features, batch_size, seed

    @classmethod
    def of_run(cls, features: np.ndarray, context, cfg) -> "ImageBatches":
        """A run's batches: its training images in batches of ``train.batch_size`` ordered by
        ``train.seed``."""
        return cls(features, cfg.train.batch_size, seed=cfg.train.seed)

    def __len__(self) -> int:
        return math.ceil(len(self.features) / self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        order = epoch_order(len(self.features), self.seed, epoch)
        for b in range(start, len(self)):
            rows = order[b * self.batch_size : (b + 1) * self.batch_size]
            features = torch.from_numpy(np.asarray(self.features[rows.numpy()], dtype=np.float32))
            bos = torch.full((len(rows), 1), BOS_ID, dtype=torch.long)
            yield Batch(features, bos, rows, (self.seed * 1_000_003 + epoch) * 1_000_003 + rows)
