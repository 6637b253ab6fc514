"""A complete training objective written against the contract alone (captioner/objectives/base.py):
the focal loss (Lin et al. 2017) over a caption's tokens, -(1 - p)^gamma log p, which spends less
of the gradient on words the model already predicts well. To add it to captioner, copy this file
to captioner/objectives/focal_loss.py and write conf/objective/focal_loss.yaml:

    defaults:
      - focal_loss_schema
      - _self_

then train with `python -m captioner.train objective=focal_loss`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from captioner.config import ObjectiveConfig, at_least
from captioner.data.batches import Batch, CaptionBatches
from captioner.models.base import target_positions
from captioner.objectives import OBJECTIVES
from captioner.objectives.base import Objective, ObjectiveOutput


@dataclass
class FocalLossConfig(ObjectiveConfig):
    name: str = "focal_loss"
    gamma: float = at_least(2.0, 0.0)  # 0: plain cross-entropy


@OBJECTIVES.register("focal_loss", FocalLossConfig)
class FocalLoss(Objective):
    def __init__(self, gamma: float):
        self.gamma = gamma

    @classmethod
    def from_config(cls, cfg, context) -> "FocalLoss":
        return cls(cfg.gamma)

    def batches(self, features, context, cfg) -> CaptionBatches:
        """Every (image, caption) pair once per epoch, in an order fixed by (train.seed, epoch)."""
        return CaptionBatches.of_run(features, context, cfg)

    def __call__(self, model, batch: Batch) -> ObjectiveOutput:
        where = target_positions(batch.tokens)  # the real target tokens, not padding
        out = model.teacher_forced(batch.features, batch.tokens, where)
        logprobs = F.log_softmax(out.logits.float(), dim=-1).gather(1, batch.tokens[:, 1:][where][:, None])[:, 0]
        loss = -((1.0 - logprobs.exp()) ** self.gamma * logprobs).mean()
        if out.penalty is not None:  # the model's own loss terms (Show-Attend-Tell's attention penalty)
            loss = loss + out.penalty
        return ObjectiveOutput(loss, int(where.sum()), {"token_prob": float(logprobs.detach().exp().mean())},
                               row_mean=out.penalty)  # (torchrun weights the penalty by rows, not tokens)
