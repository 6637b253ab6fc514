"""The objective contract: what every training objective provides, written once.

An objective is a subclass of ``Objective`` registered with ``@OBJECTIVES.register(name, Schema)``.
It writes three things, and the trainer calls them in this order:

- ``from_config(cfg, context) -> Objective`` (a classmethod), once per run: ``cfg`` is the
  ``objective`` config node, ``context`` an ``ObjectiveContext`` (vocabulary, the training
  split's records, the decode settings, the device).
- ``batches(features, context, cfg)``, once per run: its training batches over the training
  split's ``features`` (an array, row i the feature of ``context.records[i]``); ``cfg`` is the
  whole run config (``train.batch_size``, ``train.seed``, ``data.max_length``). It returns an
  object with ``len()`` (batches per epoch) and ``epoch(epoch, start) -> iterator of
  captioner.data.batches.Batch`` whose order is a function of (seed, epoch) alone, so a resumed
  run skips to the exact batch: ``CaptionBatches`` (every image-caption pair) and
  ``ImageBatches`` (every image, with per-image seeds) are the two there are.
- ``__call__(model, batch) -> ObjectiveOutput``, every step: the loss to minimize (a mean over
  ``weight`` units: tokens, captions), its weight and the figures to log as ``train/<name>``.
  It reaches the model through the decoder contract (``captioner.models.base``): per-token
  logits and the model's own loss terms from ``model.teacher_forced``, captions from
  ``captioner.decoding.search`` and ``model.sequence_logprobs``. Under torchrun the call runs
  inside DDP's forward (``captioner.training.distributed``), and the ranks combine the means by
  their weights exactly.

A class that lacks one of the three fails when it registers (``captioner.registry``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch



@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # the mean to minimize
    weight: int  # how many units the mean is over (the epoch mean and torchrun weight by it)
    figures: dict[str, float] = field(default_factory=dict)  # logged as train/<name>
    # the part of ``loss`` that is a mean over the batch's rows instead (the decoder's own terms,
    # ``TeacherForced.penalty``): torchrun weights it by each rank's share of the rows, as one
    # process does, not by its share of ``weight`` (a rank of longer captions holds more tokens)
    row_mean: Optional[torch.Tensor] = None


@dataclass
class ObjectiveContext:
    """What an objective may need beyond its config: the vocabulary, the training split's records
    (references, for rewards), the decode settings and the device."""

    vocab: Any
    records: Sequence[Any]
    decode: Any
    device: torch.device


class Objective:
    """The base class of every training objective; see the module docstring for the contract."""

    @classmethod
    def from_config(cls, cfg, context: ObjectiveContext) -> "Objective":
        raise NotImplementedError

    def batches(self, features, context: ObjectiveContext, cfg):
        raise NotImplementedError

    def __call__(self, model, batch) -> ObjectiveOutput:
        raise NotImplementedError


REQUIRED = ("from_config", "batches", "__call__")  # what each objective writes
