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

It speaks the decoding protocol of every decoder (``init_state`` / ``step`` / ``reorder_state``),
so greedy, sampling, beam search, ensembles and SCST decode it unchanged; each step leaves its
attention weights in the state, and ``attention_maps`` gives them for given captions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from captioner.config import ModelConfig, at_least, between
from captioner.models import MODELS, caption_logprobs
from captioner.vocab import PAD_ID


@dataclass
class ShowAttendTellConfig(ModelConfig):
    name: str = "show_attend_tell"
    embed_dim: int = at_least(256, 1)
    hidden_dim: int = at_least(256, 1)
    attention_dim: int = at_least(256, 1)
    dropout: float = between(0.5, 0.0, 1.0)
    gate: bool = True  # the gating scalar beta on the context vector
    attention_penalty: float = at_least(1.0, 0.0)  # lambda of the doubly stochastic regularization; 0: off


class AttentionState(NamedTuple):
    """Between steps: the LSTM's (h, c) [B, H], the regions [B, R, D] and their attention keys
    [B, R, A] (computed once per image), and the last step's attention weights [B, R]."""

    h: torch.Tensor
    c: torch.Tensor
    regions: torch.Tensor
    keys: torch.Tensor
    attention: Optional[torch.Tensor] = None


@MODELS.register("show_attend_tell", ShowAttendTellConfig)
class ShowAttendTell(nn.Module):
    reads_grid = True

    def __init__(self, vocab_size: int, feature_dim: int, embed_dim: int = 512, hidden_dim: int = 512,
                 attention_dim: int = 512, dropout: float = 0.5, gate: bool = True,
                 attention_penalty: float = 1.0, pad_id: int = PAD_ID):
        super().__init__()
        self.vocab_size, self.feature_dim, self.embed_dim = vocab_size, feature_dim, embed_dim
        self.attention_penalty, self.pad_id = attention_penalty, pad_id
        self.init_h = nn.Linear(feature_dim, hidden_dim)
        self.init_c = nn.Linear(feature_dim, hidden_dim)
        self.region_key = nn.Linear(feature_dim, attention_dim)
        self.hidden_query = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)
        self.gate = nn.Linear(hidden_dim, 1) if gate else None
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.cell = nn.LSTMCell(embed_dim + feature_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_dim, vocab_size)

    # -- the image step -----------------------------------------------------------------
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
        energy = self.score(torch.tanh(state.keys + self.hidden_query(state.h).unsqueeze(1))).squeeze(2)
        alpha = energy.softmax(dim=1)
        context = torch.bmm(alpha.unsqueeze(1), state.regions).squeeze(1)
        if self.gate is not None:
            context = torch.sigmoid(self.gate(state.h)) * context
        gates = (word_gates + F.linear(context, self.cell.weight_ih[:, self.embed_dim:])
                 + F.linear(state.h, self.cell.weight_hh))
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * state.c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return AttentionState(h, c, state.regions, state.keys, alpha)

    # -- teacher forcing ----------------------------------------------------------------
    def _teacher_forced(self, features: torch.Tensor, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [B, T, H] and attention weights [B, T, R] after reading each of ``inputs``."""
        state = self.init_state(features)
        word_gates = self._word_gates(inputs)
        hidden, alphas = [], []
        for t in range(inputs.size(1)):
            state = self._advance(word_gates[:, t], state)
            hidden.append(state.h)
            alphas.append(state.attention)
        return torch.stack(hidden, dim=1), torch.stack(alphas, dim=1)

    def _real_logits(self, features: torch.Tensor, tokens: torch.Tensor):
        """(logits [n, V] of the real target positions, their targets [n], the mask [B, T-1],
        the attention weights [B, T-1, R])."""
        hidden, alphas = self._teacher_forced(features, tokens[:, :-1])
        targets = tokens[:, 1:]
        mask = targets != self.pad_id
        return self.output(self.dropout(hidden[mask])), targets[mask], mask, alphas

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, T-1, V] predicting tokens[:, 1:] from tokens[:, :-1]."""
        hidden, _ = self._teacher_forced(features, tokens[:, :-1])
        return self.output(self.dropout(hidden))

    def loss(self, features: torch.Tensor, tokens: torch.Tensor,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over real target tokens (plus the attention penalty), and their count."""
        logits, real, mask, alphas = self._real_logits(features, tokens)
        loss = F.cross_entropy(logits, real, label_smoothing=label_smoothing)
        if self.attention_penalty:
            coverage = (alphas * mask.unsqueeze(2)).sum(dim=1)  # [B, R]: each region's total over the words
            loss = loss + self.attention_penalty * ((1.0 - coverage) ** 2).mean()
        return loss, real.numel()

    def sequence_logprobs(self, features: torch.Tensor, tokens: torch.Tensor,
                          temperature: float = 1.0) -> torch.Tensor:
        """log p(caption | image) [B] of each row of ``tokens`` (<bos> w1 .. wn <eos>, padded),
        <eos> included, in one teacher-forced pass; with ``temperature``, under the distribution
        whose logits are divided by it (what ``decoding.draw`` samples from)."""
        logits, real, mask, _ = self._real_logits(features, tokens)
        return caption_logprobs(logits, real, mask, temperature)

    @torch.no_grad()
    def attention_maps(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The weights [B, T-1, R] the model gave the regions before predicting each of tokens[:, 1:]."""
        return self._teacher_forced(features, tokens[:, :-1])[1]

    # -- one step at a time, for decoding ------------------------------------------------
    def step(self, tokens: torch.Tensor, state: AttentionState) -> tuple[torch.Tensor, AttentionState]:
        """Log-probabilities [B, V] of the next token after ``tokens`` [B]; the state carries this
        step's attention weights."""
        state = self._advance(self._word_gates(tokens), state)
        return F.log_softmax(self.output(state.h), dim=-1), state

    @staticmethod
    def reorder_state(state: AttentionState, index: torch.Tensor) -> AttentionState:
        """Select (and repeat) batch rows of the state, e.g. to follow beam back-pointers."""
        return AttentionState(*(None if t is None else t.index_select(0, index) for t in state))

    @torch.no_grad()
    def generate(self, features: torch.Tensor, method: str = "greedy", **options):
        """Decode captions for a batch of region features; see ``captioner.decoding``."""
        from captioner.decoding import generate

        return generate(self, features, method=method, **options)

    @classmethod
    def from_config(cls, cfg, vocab_size: int, feature_dim: int) -> "ShowAttendTell":
        return cls(vocab_size=vocab_size, feature_dim=feature_dim, embed_dim=cfg.embed_dim, hidden_dim=cfg.hidden_dim,
                   attention_dim=cfg.attention_dim, dropout=cfg.dropout, gate=cfg.gate,
                   attention_penalty=cfg.attention_penalty)
