"""Show, Attend and Tell (Xu et al. 2015): soft attention over the image's regions at every word.

The decoder reads a grid of region features [B, R, D] (``reads_grid``: the encoder's last
convolutional map). Before each word it scores every region against the previous hidden state
(additive attention: w . tanh(W_r r_i + W_h h)), takes the softmax-weighted mean of the regions,
scales it by the gating scalar beta = sigmoid(f_beta . h) (the paper's one number per step: how
much the word needs the image; sgrvinod's tutorial uses one per channel), and feeds
[word embedding; context] to an LSTM cell. The initial state comes from the mean region feature.
``attention_penalty`` is the paper's doubly stochastic regularization: lambda x
(1 - sum_t alpha_ti)^2, every region attended about once over the caption, averaged over the
regions (as sgrvinod's tutorial does; the paper sums them, against a loss summed over the
words), so that at lambda = 1 it stays below the per-word cross-entropy it is added to.

The score layer has no bias: a softmax does not see a shift, so a bias there would get an exactly
zero gradient and never learn (checkpoints written with one load without it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from captioner.config import ModelConfig, at_least, between, shaping
from captioner.data.vocab import PAD_ID
from captioner.models import MODELS
from captioner.models.base import Decoder, TeacherForced
from captioner.models.layers import additive_attention, lstm_cell, unroll


@dataclass
class ShowAttendTellConfig(ModelConfig):
    name: str = "show_attend_tell"
    embed_dim: int = at_least(256, 1, shapes=True)
    hidden_dim: int = at_least(256, 1, shapes=True)
    attention_dim: int = at_least(256, 1, shapes=True)
    dropout: float = between(0.5, 0.0, 1.0)
    gate: bool = shaping(True)  # the gating scalar beta on the context vector
    attention_penalty: float = at_least(1.0, 0.0)  # lambda of the doubly stochastic regularization; 0: off


class AttentionState(NamedTuple):
    """Between steps: the LSTM's (h, c) [B, H], the regions [B, R, D] and their attention keys
    [B, R, A] (computed once per image), and the last step's attention weights [B, R]."""

    h: torch.Tensor
    c: torch.Tensor
    regions: torch.Tensor
    keys: torch.Tensor
    attention: Optional[torch.Tensor] = None


def _drop_score_bias(state_dict, prefix, *args) -> None:
    """Checkpoints written before the score layer lost its bias: the bias never learned (see the
    module docstring) and changes no attention weight, so it is dropped."""
    state_dict.pop(prefix + "score.bias", None)


@MODELS.register("show_attend_tell", ShowAttendTellConfig)
class ShowAttendTell(Decoder):
    reads_grid = True
    attends = True

    def __init__(self, vocab_size: int, feature_dim: int, embed_dim: int = 512, hidden_dim: int = 512,
                 attention_dim: int = 512, dropout: float = 0.5, gate: bool = True,
                 attention_penalty: float = 1.0, pad_id: int = PAD_ID):
        super().__init__(vocab_size, feature_dim)
        self.embed_dim, self.attention_penalty = embed_dim, attention_penalty
        self.init_h = nn.Linear(feature_dim, hidden_dim)
        self.init_c = nn.Linear(feature_dim, hidden_dim)
        self.region_key = nn.Linear(feature_dim, attention_dim)
        self.hidden_query = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1, bias=False)
        self.gate = nn.Linear(hidden_dim, 1) if gate else None
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.cell = nn.LSTMCell(embed_dim + feature_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_dim, vocab_size)
        self._register_load_state_dict_pre_hook(_drop_score_bias)

    def init_state(self, features: torch.Tensor) -> AttentionState:
        """State ready to read <bos>, from the regions [B, R, D]."""
        mean = features.mean(dim=1)
        return AttentionState(torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)), features,
                              self.region_key(features))

    def _word_gates(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embedding's share of the LSTM gates, for every position of ``tokens`` at once."""
        weight = self.cell.weight_ih[:, : self.embed_dim]
        return F.linear(self.embed(tokens), weight, self.cell.bias_ih + self.cell.bias_hh)

    def _advance(self, word_gates: torch.Tensor, state: AttentionState) -> AttentionState:
        """One word: attend with the previous hidden state, then the LSTM cell (nn.LSTMCell's
        arithmetic, its input [word; context] split so the word's share is computed in bulk)."""
        context, alpha = additive_attention(state.keys, self.hidden_query(state.h), self.score, state.regions)
        if self.gate is not None:
            context = torch.sigmoid(self.gate(state.h)) * context
        gates = (word_gates + F.linear(context, self.cell.weight_ih[:, self.embed_dim:])
                 + F.linear(state.h, self.cell.weight_hh))
        h, c = lstm_cell(gates, state.c)
        return AttentionState(h, c, state.regions, state.keys, alpha)

    def teacher_forced(self, features: torch.Tensor, tokens: torch.Tensor, where: torch.Tensor) -> TeacherForced:
        hidden, alphas = unroll(self._advance, self._word_gates(tokens[:, :-1]), self.init_state(features),
                                lambda state: state.h)
        penalty = None
        if self.attention_penalty:
            coverage = (alphas * where.unsqueeze(2)).sum(dim=1)  # [B, R]: each region's total over the words
            penalty = self.attention_penalty * ((1.0 - coverage) ** 2).mean()
        return TeacherForced(self.output(self.dropout(hidden[where])), penalty, alphas)

    def step(self, tokens: torch.Tensor, state: AttentionState) -> tuple[torch.Tensor, AttentionState]:
        """The state carries this step's attention weights."""
        state = self._advance(self._word_gates(tokens), state)
        return self.output(self.dropout(state.h)), state

    @classmethod
    def from_config(cls, cfg, vocab_size: int, feature_dim: int) -> "ShowAttendTell":
        return cls(vocab_size=vocab_size, feature_dim=feature_dim, embed_dim=cfg.embed_dim, hidden_dim=cfg.hidden_dim,
                   attention_dim=cfg.attention_dim, dropout=cfg.dropout, gate=cfg.gate,
                   attention_penalty=cfg.attention_penalty)
