"""Att2in (Rennie et al. 2017, "Self-critical Sequence Training for Image Captioning"): the
attended image enters the LSTM's cell input only.

The decoder reads a grid of region features [B, R, D] (``reads_grid``). Before each word it
scores every region against the previous hidden state with additive attention
(w . tanh(W_r r_i + W_h h), as self-critical.pytorch's Att2inCore) and takes the softmax-weighted
mean of the regions, the context. The LSTM's input, forget and output gates see the word and the
previous hidden state only; the context is added to the cell's candidate alone, through the
paper's maxout of two units: c = f * c + i * max(W_x x + W_h h + W_c ctx) over the two units.

What differs from show_attend_tell: the context is not part of the LSTM's input (it never opens
or closes a gate), there is no gating scalar and no attention penalty, the candidate is a maxout
instead of a tanh, and the state starts at zero (the image enters only through attention), as in
the paper and self-critical.pytorch. The regions' keys are computed once per image in
``init_state``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from captioner.config import ModelConfig, at_least, between
from captioner.data.vocab import PAD_ID
from captioner.models import MODELS
from captioner.models.base import Decoder, TeacherForced
from captioner.models.layers import additive_attention, unroll


@dataclass
class Att2inConfig(ModelConfig):
    name: str = "att2in"
    embed_dim: int = at_least(512, 1, shapes=True)
    hidden_dim: int = at_least(512, 1, shapes=True)
    attention_dim: int = at_least(512, 1, shapes=True)
    dropout: float = between(0.5, 0.0, 1.0)


class Att2inState(NamedTuple):
    """Between steps, batch first: the LSTM's (h, c) [B, H], the regions [B, R, D] and their
    attention keys [B, R, A] (computed once per image), and the last step's attention [B, R]."""

    h: torch.Tensor
    c: torch.Tensor
    regions: torch.Tensor
    keys: torch.Tensor
    attention: Optional[torch.Tensor] = None


@MODELS.register("att2in", Att2inConfig)
class Att2in(Decoder):
    reads_grid = True
    attends = True

    def __init__(self, vocab_size: int, feature_dim: int, embed_dim: int = 512, hidden_dim: int = 512,
                 attention_dim: int = 512, dropout: float = 0.5, pad_id: int = PAD_ID):
        super().__init__(vocab_size, feature_dim)
        self.hidden_dim = hidden_dim
        self.region_key = nn.Linear(feature_dim, attention_dim)
        self.hidden_query = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1, bias=False)  # (a bias would not move a softmax)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        # the word and the previous h give the three gates and the two maxout units of the
        # candidate: [i, f, o, g1, g2] x H; the context gives the candidate's two units only
        self.word_gates = nn.Linear(embed_dim, 5 * hidden_dim)
        self.hidden_gates = nn.Linear(hidden_dim, 5 * hidden_dim, bias=False)
        self.context_cell = nn.Linear(feature_dim, 2 * hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_dim, vocab_size)

    def init_state(self, features: torch.Tensor) -> Att2inState:
        """State ready to read <bos>, from the regions [B, R, D]: zero (h, c), the keys once."""
        zeros = features.new_zeros(features.size(0), self.hidden_dim)
        return Att2inState(zeros, zeros, features, self.region_key(features))

    def _advance(self, word_gates: torch.Tensor, state: Att2inState) -> Att2inState:
        """One word, from its share of the gates [B, 5H]: attend with the previous h, then the
        cell with the context in its candidate only."""
        context, alpha = additive_attention(state.keys, self.hidden_query(state.h), self.score, state.regions)
        sums = word_gates + self.hidden_gates(state.h)
        i, f, o = torch.sigmoid(sums[:, : 3 * self.hidden_dim]).chunk(3, dim=1)
        g1, g2 = (sums[:, 3 * self.hidden_dim :] + self.context_cell(context)).chunk(2, dim=1)
        c = f * state.c + i * torch.maximum(g1, g2)
        h = o * torch.tanh(c)
        return Att2inState(h, c, state.regions, state.keys, alpha)

    def teacher_forced(self, features: torch.Tensor, tokens: torch.Tensor, where: torch.Tensor) -> TeacherForced:
        word_gates = self.word_gates(self.embed(tokens[:, :-1]))  # every position's share at once
        hidden, alphas = unroll(self._advance, word_gates, self.init_state(features), lambda state: state.h)
        return TeacherForced(self.output(self.dropout(hidden[where])), None, alphas)

    def step(self, tokens: torch.Tensor, state: Att2inState) -> tuple[torch.Tensor, Att2inState]:
        """The state carries this step's attention weights."""
        state = self._advance(self.word_gates(self.embed(tokens)), state)
        return self.output(self.dropout(state.h)), state

    @classmethod
    def from_config(cls, cfg, vocab_size: int, feature_dim: int) -> "Att2in":
        return cls(vocab_size=vocab_size, feature_dim=feature_dim, embed_dim=cfg.embed_dim,
                   hidden_dim=cfg.hidden_dim, attention_dim=cfg.attention_dim, dropout=cfg.dropout)
