"""Cross-entropy with teacher forcing: the mean negative log-likelihood of every real caption
token (the model's ``loss``), optionally label-smoothed."""
from __future__ import annotations

from dataclasses import dataclass

from captioner.config import ObjectiveConfig, between
from captioner.objectives import OBJECTIVES, Batch, ObjectiveOutput


@dataclass
class CrossEntropyConfig(ObjectiveConfig):
    name: str = "cross_entropy"
    label_smoothing: float = between(0.0, 0.0, 1.0)


@OBJECTIVES.register("cross_entropy", CrossEntropyConfig)
class CrossEntropy:
    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, cfg, context) -> "CrossEntropy":
        return cls(cfg.label_smoothing)

    def batches(self, features, context, cfg):
        """Every (image, caption) pair, shuffled per epoch."""
        from captioner.engine import CaptionBatches

        return CaptionBatches(features, context.records, context.vocab, cfg.data.max_length, cfg.train.batch_size,
                              seed=cfg.train.seed)

    def __call__(self, model, batch: Batch) -> ObjectiveOutput:
        loss, n_tokens = model.loss(batch.features, batch.tokens, self.label_smoothing)
        return ObjectiveOutput(loss, n_tokens)
