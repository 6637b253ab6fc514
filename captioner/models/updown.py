"""Up-Down (Anderson et al. 2018, "Bottom-Up and Top-Down Attention for Image Captioning and
Visual Question Answering"): the top-down captioning model, two LSTMs per word.

The decoder reads a grid of region features [B, R, D] (``reads_grid``: here the CNN grid's cells
are the regions, where the paper has Faster R-CNN's boxes). Each word:

- the attention LSTM reads [the language LSTM's previous h; the mean region; the word embedding];
- additive attention from its new h over the regions (w . tanh(W_v v_i + W_h h1)) gives the
  attended region, the softmax-weighted mean;
- the language LSTM reads [the attended region; the attention LSTM's h], and the logits come from
  its h.

What differs from show_attend_tell: attention is from the attention LSTM's current h (not from
the previous step's state) and feeds a second LSTM, the mean region is read at every word instead
of setting the initial state (which is zero, as in self-critical.pytorch's TopDownCore), and there
is no gating scalar or attention penalty. Per image, once (``init_state``): the regions' keys
and the mean region's share of the attention LSTM's gates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from captioner.config import ModelConfig, at_least, between
from captioner.data.vocab import PAD_ID
from captioner.models import MODELS
from captioner.models.base import Decoder, TeacherForced
from captioner.models.layers import additive_attention, lstm_cell, unroll


@dataclass
class UpDownConfig(ModelConfig):
    name: str = "updown"
    embed_dim: int = at_least(512, 1, shapes=True)
    hidden_dim: int = at_least(512, 1, shapes=True)  # both LSTMs
    attention_dim: int = at_least(512, 1, shapes=True)
    dropout: float = between(0.5, 0.0, 1.0)


class UpDownState(NamedTuple):
    """Between steps, batch first: the attention LSTM's (h, c) and the language LSTM's (h, c)
    [B, H]; per image, the regions [B, R, D], their keys [B, R, A] and the mean region's share of
    the attention LSTM's gates [B, 4H] (its biases included); the last step's attention [B, R]."""

    att_h: torch.Tensor
    att_c: torch.Tensor
    lang_h: torch.Tensor
    lang_c: torch.Tensor
    regions: torch.Tensor
    keys: torch.Tensor
    image_gates: torch.Tensor
    attention: Optional[torch.Tensor] = None


@MODELS.register("updown", UpDownConfig)
class UpDown(Decoder):
    reads_grid = True
    attends = True

    def __init__(self, vocab_size: int, feature_dim: int, embed_dim: int = 512, hidden_dim: int = 512,
                 attention_dim: int = 512, dropout: float = 0.5, pad_id: int = PAD_ID):
        super().__init__(vocab_size, feature_dim)
        self.hidden_dim = hidden_dim
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        # input [language h; mean region; word], split by hand so each share is computed where it
        # changes: the mean region's once per image, the words' once per caption
        self.att_cell = nn.LSTMCell(hidden_dim + feature_dim + embed_dim, hidden_dim)
        self.region_key = nn.Linear(feature_dim, attention_dim)
        self.hidden_query = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1, bias=False)  # (a bias would not move a softmax)
        self.lang_cell = nn.LSTMCell(feature_dim + hidden_dim, hidden_dim)  # [attended region; attention h]
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_dim, vocab_size)

    def init_state(self, features: torch.Tensor) -> UpDownState:
        """State ready to read <bos>, from the regions [B, R, D]: zero LSTM states; the keys and
        the mean region's share of the attention LSTM's gates, once per image."""
        h, d = self.hidden_dim, self.feature_dim
        cell = self.att_cell
        image_gates = F.linear(features.mean(dim=1), cell.weight_ih[:, h : h + d], cell.bias_ih + cell.bias_hh)
        zeros = features.new_zeros(features.size(0), h)
        return UpDownState(zeros, zeros, zeros, zeros, features, self.region_key(features), image_gates)

    def _word_gates(self, tokens: torch.Tensor) -> torch.Tensor:
        """The word's share of the attention LSTM's gates, for every position of ``tokens`` at once."""
        return F.linear(self.embed(tokens), self.att_cell.weight_ih[:, self.hidden_dim + self.feature_dim :])

    def _advance(self, word_gates: torch.Tensor, state: UpDownState) -> UpDownState:
        cell = self.att_cell
        gates = (word_gates + state.image_gates + F.linear(state.lang_h, cell.weight_ih[:, : self.hidden_dim])
                 + F.linear(state.att_h, cell.weight_hh))
        att_h, att_c = lstm_cell(gates, state.att_c)
        attended, alpha = additive_attention(state.keys, self.hidden_query(att_h), self.score, state.regions)
        lang_h, lang_c = self.lang_cell(torch.cat([attended, att_h], dim=1), (state.lang_h, state.lang_c))
        return UpDownState(att_h, att_c, lang_h, lang_c, state.regions, state.keys, state.image_gates, alpha)

    def teacher_forced(self, features: torch.Tensor, tokens: torch.Tensor, where: torch.Tensor) -> TeacherForced:
        hidden, alphas = unroll(self._advance, self._word_gates(tokens[:, :-1]), self.init_state(features),
                                lambda state: state.lang_h)
        return TeacherForced(self.output(self.dropout(hidden[where])), None, alphas)

    def step(self, tokens: torch.Tensor, state: UpDownState) -> tuple[torch.Tensor, UpDownState]:
        """The state carries this step's attention weights."""
        state = self._advance(self._word_gates(tokens), state)
        return self.output(self.dropout(state.lang_h)), state

    @classmethod
    def from_config(cls, cfg, vocab_size: int, feature_dim: int) -> "UpDown":
        return cls(vocab_size=vocab_size, feature_dim=feature_dim, embed_dim=cfg.embed_dim,
                   hidden_dim=cfg.hidden_dim, attention_dim=cfg.attention_dim, dropout=cfg.dropout)
