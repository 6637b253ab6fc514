"""Fine-tuning the CNN (``encoder.finetune_after``): up to that step the decoder trains on cached
features; from it on, on images, with the encoder unfrozen in its own parameter group (BatchNorm
statistics kept: fine-tuning batches are small)."""
from __future__ import annotations

import itertools
import logging
from typing import Iterator

import numpy as np
import torch

from captioner.objectives import Batch

log = logging.getLogger("captioner.finetune")


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

    def image_batches(self, batches, epoch: int, records, start: int, steps_left: int = 0) -> Iterator[Batch]:
        """The rest of ``epoch`` from batch ``start`` as images, the encoder unfrozen."""
        if self.encoder.frozen:
            self.encoder.unfreeze().train()
            log.info("fine-tuning the encoder from here on (encoder.finetune_lr=%g)", self.lr)
        from captioner.features import image_workers

        images = batches.epoch_images(epoch, records, self.encoder, start=start, num_workers=image_workers(self.cfg))
        return itertools.islice(images, steps_left) if steps_left else images

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.encoder.normalize(images))

    def features(self, records) -> np.ndarray:
        """Features of ``records`` from the encoder as it is now (the cache describes the original).
        Eager: a compiled graph would be rebuilt at every validation, costing more than it saves."""
        from captioner.features import compute_features, extraction_options

        return compute_features(self.encoder, records, device=self.device,
                                **{**extraction_options(self.cfg), "compile": False})
