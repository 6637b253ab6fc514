"""Training objectives behind one interface, keyed by ``objective.name``.

An objective turns a training batch into the loss to minimize and the figures to log; the
training loop never knows which one it runs (self-critical.pytorch's loss wrapper). Each module
of this package defines one, decorated with ``@OBJECTIVES.register(name, Schema)`` (``Schema``
a subclass of ``captioner.config.ObjectiveConfig``) and selected by ``conf/objective/<name>.yaml``.

An objective is built once per run with ``from_config(cfg, context)``; ``batches(features, cfg)``
makes its training batches (captions for cross-entropy, images for self-critical training) and
it is called as ``objective(model, batch) -> ObjectiveOutput``. Under torchrun the call runs inside DDP's
forward (``captioner.distributed``), so the loss is a mean over ``weight`` units (tokens,
captions) that the ranks combine exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Sequence

import torch

from captioner.registry import Registry

OBJECTIVES = Registry("objective", __name__)


class Batch(NamedTuple):
    """A training batch: features [B, D] (or images, when the encoder is fine-tuned), tokens
    [B, T] (<bos> w1 .. wn <eos>, padded), each row's index into the split's records and, for
    objectives that draw samples, each row's random seed (a function of the run's seed, the epoch
    and the image: never of the process or of where the row sits in the batch)."""

    features: torch.Tensor
    tokens: torch.Tensor
    rows: torch.Tensor
    seeds: Optional[torch.Tensor] = None


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # the mean to minimize
    weight: int  # how many units the mean is over (the epoch mean and torchrun weight by it)
    figures: dict[str, float] = field(default_factory=dict)  # logged as train/<name>


@dataclass
class ObjectiveContext:
    """What an objective may need beyond its config: the vocabulary, the training split's records
    (references, for rewards), the decode settings and the device."""

    vocab: Any
    records: Sequence[Any]
    decode: Any
    device: torch.device


def build_objective(objective_cfg, context: ObjectiveContext):
    return OBJECTIVES.get(objective_cfg.name).from_config(objective_cfg, context)
