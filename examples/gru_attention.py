"""A complete decoder written against the contract alone (captioner/models/base.py): a GRU that
attends over the image's regions with scaled dot-product attention. To add it to captioner, copy
this file to captioner/models/gru_attention.py and write conf/model/gru_attention.yaml:

    defaults:
      - gru_attention_schema
      - _self_

then train it with `python -m captioner.train model=gru_attention`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from captioner.config import ModelConfig, at_least, between
from captioner.models import MODELS
from captioner.models.base import Decoder, TeacherForced


@dataclass
class GruAttentionConfig(ModelConfig):
    name: str = "gru_attention"
    embed_dim: int = at_least(128, 1, shapes=True)  # shapes=True: a checkpoint loads only with the same value
    hidden_dim: int = at_least(256, 1, shapes=True)
    dropout: float = between(0.3, 0.0, 1.0)


class State(NamedTuple):  # every tensor batch first, so the shared reorder_state can follow beams
    h: torch.Tensor  # [B, H]
    keys: torch.Tensor  # [B, R, H]: the regions projected once per image
    attention: torch.Tensor  # [B, R]: the last step's weights


@MODELS.register("gru_attention", GruAttentionConfig)
class GruAttention(Decoder):
    reads_grid = True  # region features [B, R, D] from the encoder's last convolutional map
    attends = True  # teacher_forced returns attention weights: strips and the error page show them

    def __init__(self, vocab_size: int, feature_dim: int, embed_dim: int, hidden_dim: int, dropout: float):
        super().__init__(vocab_size, feature_dim)
        self.region_key = nn.Linear(feature_dim, hidden_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.cell = nn.GRUCell(embed_dim + hidden_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_dim, vocab_size)

    @classmethod
    def from_config(cls, cfg, vocab_size: int, feature_dim: int) -> "GruAttention":
        return cls(vocab_size, feature_dim, cfg.embed_dim, cfg.hidden_dim, cfg.dropout)

    def init_state(self, features: torch.Tensor) -> State:
        keys = self.region_key(features)
        return State(keys.mean(dim=1).tanh(), keys, features.new_zeros(features.shape[:2]))

    def _advance(self, tokens: torch.Tensor, state: State) -> State:
        scores = torch.einsum("brh,bh->br", state.keys, state.h) / state.h.size(1) ** 0.5
        attention = scores.softmax(dim=1)
        context = torch.einsum("br,brh->bh", attention, state.keys)
        h = self.cell(torch.cat([self.embed(tokens), context], dim=1), state.h)
        return State(h, state.keys, attention)

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        state = self._advance(tokens, state)
        return self.output(self.dropout(state.h)), state

    def teacher_forced(self, features: torch.Tensor, tokens: torch.Tensor, where: torch.Tensor) -> TeacherForced:
        state, hidden, maps = self.init_state(features), [], []
        for t in range(tokens.size(1) - 1):  # read tokens[:, t], predict tokens[:, t + 1]
            state = self._advance(tokens[:, t], state)
            hidden.append(state.h)
            maps.append(state.attention)
        hidden = torch.stack(hidden, dim=1)
        # the output layer only where `where` says a real target is: padding costs nothing
        return TeacherForced(self.output(self.dropout(hidden[where])), attention=torch.stack(maps, dim=1))
