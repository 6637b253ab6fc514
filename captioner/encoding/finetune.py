"""Fine-tuning the CNN (``encoder.finetune_after``): up to that step the decoder trains on cached
features; from it on, on images, with the encoder unfrozen in its own parameter group (BatchNorm
statistics kept: fine-tuning batches are small)."""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from captioner.data.batches import Batch, CaptionBatches
from captioner.data.images import BadImageError
from captioner.encoding.features import ImageFiles, collate, compute_features, extraction_options, image_workers

log = logging.getLogger("captioner.encoding.finetune")


class EncoderFineTuning:
    def __init__(self, encoder, encoder_cfg, device: torch.device):
        self.encoder = encoder.to(device)
        self.after, self.lr = int(encoder_cfg.finetune_after), float(encoder_cfg.finetune_lr)
        self.cfg, self.device = encoder_cfg, device

    def param_group(self) -> dict:
        """Its own group from the start (no gradients until ``after``), so checkpoints keep one shape."""
        return {"params": list(self.encoder.parameters()), "lr": self.lr}

    def active(self, step: int) -> bool:
        return step >= self.after

    def feature_steps(self, step: int) -> int:
        """How many of the next steps still read cached features."""
        return max(0, self.after - step)

    def image_batches(self, batches: CaptionBatches, epoch: int, records, start: int,
                      steps_left: int = 0) -> Iterator[Batch]:
        """The rest of ``epoch`` from batch ``start``, the batches ``batches`` gives with each pair's
        image instead of its feature: uint8 images [B, 3, H, W] as the encoder crops them, read in
        DataLoader workers (``encoder.normalize`` finishes them in the step). The encoder is
        unfrozen here, at the call, before the batches are read: under torchrun its DDP is built
        right after, from the parameters that need gradients then."""
        if self.encoder.frozen:
            self.encoder.unfreeze().train()
            log.info("fine-tuning the encoder from here on (encoder.finetune_lr=%g)", self.lr)
        rows_and_tokens = list(batches.epoch_rows(epoch, start))
        return self._read(records, rows_and_tokens[:steps_left] if steps_left else rows_and_tokens)

    def _read(self, records, rows_and_tokens: list) -> Iterator[Batch]:
        # A private generator: worker seeds must not draw from (and shift) the global RNG.
        loader = DataLoader(ImageFiles([r.path for r in records], self.encoder.crop),
                            batch_sampler=[rows.tolist() for rows, _ in rows_and_tokens],
                            num_workers=image_workers(self.cfg), collate_fn=collate,
                            generator=torch.Generator().manual_seed(0))
        for (_, images, bad), (rows, tokens) in zip(loader, rows_and_tokens):
            if bad:
                raise BadImageError(bad[0][1])
            yield Batch(images, tokens, rows)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.encoder.normalize(images))

    def features(self, records) -> np.ndarray:
        """Features of ``records`` from the encoder as it is now (the cache describes the original).
        Eager: a compiled graph would be rebuilt at every validation, costing more than it saves."""
        return compute_features(self.encoder, records, device=self.device,
                                **{**extraction_options(self.cfg), "compile": False})
