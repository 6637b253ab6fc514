"""Cross-entropy with teacher forcing: the mean negative log-likelihood of every real caption
token, optionally label-smoothed, plus the model's own loss terms (e.g. Show-Attend-Tell's
attention penalty)."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from captioner.config import ObjectiveConfig, between
from captioner.data.batches import Batch, CaptionBatches
from captioner.models.base import target_positions
from captioner.objectives import OBJECTIVES
from captioner.objectives.base import Objective, ObjectiveOutput


@dataclass
class CrossEntropyConfig(ObjectiveConfig):
    name: str = "cross_entropy"
    label_smoothing: float = between(0.0, 0.0, 1.0)


@OBJECTIVES.register("cross_entropy", CrossEntropyConfig)
class CrossEntropy(Objective):
    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, cfg, context) -> "CrossEntropy":
        return cls(cfg.label_smoothing)

    def batches(self, features, context, cfg) -> CaptionBatches:
        """Every (image, caption) pair, shuffled per epoch."""
        return CaptionBatches.of_run(features, context, cfg)

    def __call__(self, model, batch: Batch) -> ObjectiveOutput:
        where = target_positions(batch.tokens)
        out = model.teacher_forced(batch.features, batch.tokens, where)
        targets = batch.tokens[:, 1:][where]
        loss = F.cross_entropy(out.logits, targets, label_smoothing=self.label_smoothing)
        if out.penalty is not None:
            loss = loss + out.penalty
        return ObjectiveOutput(loss, targets.numel(), row_mean=out.penalty)  # (numel: no extra reduction or sync)
