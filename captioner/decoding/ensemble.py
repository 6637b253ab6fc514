"""Several trained decoders that caption as one: each step averages their word probabilities.

An ``Ensemble`` offers the decoding protocol every decoding method uses (``init_state``,
``next_logprobs``, ``reorder_state``), so greedy, sampling and beam search decode it unchanged. The
members must share the vocabulary and read the same image features (same encoder); they may
differ in seed, size or injection mode. Averaging probabilities (not log-probabilities) is the
usual choice for captioning ensembles (Vinyals et al. 2015): a word one member rules out is not
vetoed by it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from captioner.decoding.search import DecodeOutput, generate


class Ensemble(nn.Module):
    attends = False  # the members' attention maps are not one model's

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two models")
        vocab_sizes = {m.vocab_size for m in members}
        feature_dims = {m.feature_dim for m in members}
        if len(vocab_sizes) > 1 or len(feature_dims) > 1:
            raise ValueError(f"ensemble members disagree on vocabulary size {sorted(vocab_sizes)} "
                             f"or feature size {sorted(feature_dims)}")
        if len({m.reads_grid for m in members}) > 1:
            raise ValueError("ensemble members read different features: attention decoders (region grids) "
                             "cannot be mixed with pooled-feature ones")
        self.members = nn.ModuleList(members)
        self.vocab_size, self.feature_dim = vocab_sizes.pop(), feature_dims.pop()
        self.reads_grid = members[0].reads_grid

    def init_state(self, features: torch.Tensor) -> tuple:
        return tuple(m.init_state(features) for m in self.members)

    def next_logprobs(self, tokens: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        """log of the members' mean probability of the next token, [B, V]."""
        logprobs, states = zip(*(m.next_logprobs(tokens, s) for m, s in zip(self.members, state)))
        mean = torch.logsumexp(torch.stack(logprobs), dim=0) - math.log(len(self.members))
        return mean, tuple(states)

    def reorder_state(self, state: tuple, index: torch.Tensor) -> tuple:
        return tuple(m.reorder_state(s, index) for m, s in zip(self.members, state))

    @torch.no_grad()
    def generate(self, features: torch.Tensor, method: str = "greedy", **options) -> DecodeOutput:
        return generate(self, features, method=method, **options)
