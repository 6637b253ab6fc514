"""An exponential moving average of the decoder's weights, for validation and checkpoints.

The averaged weights sit in a flat region of the loss rather than wherever the last noisy Adam
step left them; on small data sets (Flickr8k) they decode better and vary less from epoch to
epoch. The decay warms up as in TensorFlow's ExponentialMovingAverage, ``min(decay, (1 + n) /
(10 + n))`` after n updates, so the first epochs are not dominated by the random initial weights.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"optim.ema_decay={decay}: use a value in (0, 1), e.g. 0.999, or 0 for no average")
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (after an optimizer step)."""
        self.updates += 1
        keep = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for mine, theirs in zip(self.model.parameters(), model.parameters()):
            mine.lerp_(theirs.detach(), 1.0 - keep)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)
