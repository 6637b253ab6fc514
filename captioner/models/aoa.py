"""AoA (Huang et al. 2019, "Attention on Attention for Image Captioning"): the AoANet decoder, with
the encoder-side refiner as an option (``refine``).

The decoder reads a grid of region features [B, R, D] (``reads_grid``: the CNN grid's cells are
the regions), embedded once per image as A = ReLU(W_e r_i) [B, R, H]. With ``refine``, A goes
through ``refine_layers`` refining blocks first (the paper's encoder: multi-head self-attention
over the regions, AoA on [attended; A], a residual and LayerNorm), also once per image. Each word:

- the LSTM reads [word embedding; mean of A + the previous step's AoA output c_{t-1}];
- multi-head scaled dot-product attention (``heads``) from its new h over A (keys and values are
  projections of A, computed once per image) gives the attended context;
- Attention on Attention: an information vector i = W_i [ctx; h] and a gate
  g = sigmoid(W_g [ctx; h]); c_t = g * i gives the logits (W_p c_t) and is fed back to the next
  step's LSTM input.

What differs from show_attend_tell: the attention is scaled dot-product, multi-head, and from the
LSTM's current h (not additive from the previous h); what reaches the words is the gated c_t
rather than h; the image enters through the mean region added to the fed-back context at every
step, and the state starts at zero (as in self-critical.pytorch's AoA decoder core). The
attention weights reported (strips, the error page) are the mean over heads, a distribution over
the regions as each head's is.
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
from captioner.models.layers import lstm_cell, unroll


@dataclass
class AoAConfig(ModelConfig):
    name: str = "aoa"
    embed_dim: int = at_least(512, 1, shapes=True)
    hidden_dim: int = at_least(512, 1, shapes=True)  # the LSTM, the embedded regions and c_t
    # (a checkpoint's weights mean something else under another number of heads: a shape key too)
    heads: int = at_least(8, 1, shapes=True)
    dropout: float = between(0.5, 0.0, 1.0)
    refine: bool = shaping(False)  # the encoder-side refiner over the regions (the paper's AoANet encoder)
    refine_layers: int = at_least(6, 1, shapes=True)  # its blocks, when refine=true

    @staticmethod
    def check(node) -> Optional[str]:
        if node.hidden_dim % node.heads:
            return f"heads={node.heads}: must divide model.hidden_dim={node.hidden_dim}"
        return None


class AoAState(NamedTuple):
    """Between steps, batch first: the LSTM's (h, c) [B, H] and the last AoA output c_t [B, H];
    per image, the attention keys and values [B, R, H] and the mean region's share of the LSTM's
    gates [B, 4H] (its biases included); the last step's attention, the mean over heads [B, R]."""

    h: torch.Tensor
    c: torch.Tensor
    context: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    image_gates: torch.Tensor
    attention: Optional[torch.Tensor] = None


def multi_head(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention of ``query`` [B, Q, H] over ``keys``/``values`` [B, R, H] in
    ``heads`` heads of H / heads: (the heads' outputs concatenated [B, Q, H], the weights
    [B, heads, Q, R])."""
    (b, q, h), r = query.shape, keys.size(1)
    split = lambda x, n: x.reshape(b, n, heads, h // heads)  # noqa: E731
    scores = torch.einsum("bqnd,brnd->bnqr", split(query, q), split(keys, r)) / (h // heads) ** 0.5
    weights = scores.softmax(dim=-1)
    return torch.einsum("bnqr,brnd->bqnd", weights, split(values, r)).reshape(b, q, h), weights


def attention_on_attention(layer: nn.Linear, attended: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """AoA: the information i and the gate's pre-activation g from ``layer`` on [attended; query],
    returned as i * sigmoid(g)."""
    information, gate = layer(torch.cat([attended, query], dim=-1)).chunk(2, dim=-1)
    return information * torch.sigmoid(gate)


class RefiningBlock(nn.Module):
    """One block of the paper's refiner: A' = LayerNorm(A + AoA(f_mh-att(W_Q A, W_K A, W_V A), A))."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.aoa = nn.Linear(2 * dim, 2 * dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(regions).chunk(3, dim=-1)
        attended, _ = multi_head(q, k, v, self.heads)
        return self.norm(regions + attention_on_attention(self.aoa, attended, regions))


@MODELS.register("aoa", AoAConfig)
class AoA(Decoder):
    reads_grid = True
    attends = True

    def __init__(self, vocab_size: int, feature_dim: int, embed_dim: int = 512, hidden_dim: int = 512,
                 heads: int = 8, dropout: float = 0.5, refine: bool = False, refine_layers: int = 6,
                 pad_id: int = PAD_ID):
        super().__init__(vocab_size, feature_dim)
        if hidden_dim % heads:
            raise ValueError(f"heads={heads} must divide hidden_dim={hidden_dim}")
        self.embed_dim, self.hidden_dim, self.heads = embed_dim, hidden_dim, heads
        self.region_embed = nn.Linear(feature_dim, hidden_dim)
        self.refiner = nn.Sequential(*[RefiningBlock(hidden_dim, heads) for _ in range(refine_layers)]) if refine else None
        self.key_value = nn.Linear(hidden_dim, 2 * hidden_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        # input [word; mean region + c_{t-1}], split by hand: the mean region's share once per
        # image, the words' once per caption
        self.cell = nn.LSTMCell(embed_dim + hidden_dim, hidden_dim)
        self.query = nn.Linear(hidden_dim, hidden_dim)
        self.aoa = nn.Linear(2 * hidden_dim, 2 * hidden_dim)  # [ctx; h] -> [i; g]
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_dim, vocab_size)

    def regions(self, features: torch.Tensor) -> torch.Tensor:
        """A [B, R, H]: the regions embedded (and refined, with ``refine``)."""
        embedded = torch.relu(self.region_embed(features))
        return embedded if self.refiner is None else self.refiner(embedded)

    def init_state(self, features: torch.Tensor) -> AoAState:
        """State ready to read <bos>, from the regions [B, R, D]: zero (h, c) and c_0; once per
        image, A's keys and values and the mean of A's share of the LSTM's gates."""
        regions = self.regions(features)
        keys, values = self.key_value(regions).chunk(2, dim=-1)
        cell = self.cell
        image_gates = F.linear(regions.mean(dim=1), cell.weight_ih[:, self.embed_dim :], cell.bias_ih + cell.bias_hh)
        zeros = features.new_zeros(features.size(0), self.hidden_dim)
        return AoAState(zeros, zeros, zeros, keys, values, image_gates)

    def _word_gates(self, tokens: torch.Tensor) -> torch.Tensor:
        """The word's share of the LSTM's gates, for every position of ``tokens`` at once."""
        return F.linear(self.embed(tokens), self.cell.weight_ih[:, : self.embed_dim])

    def _advance(self, word_gates: torch.Tensor, state: AoAState) -> AoAState:
        cell = self.cell
        gates = (word_gates + state.image_gates + F.linear(state.context, cell.weight_ih[:, self.embed_dim :])
                 + F.linear(state.h, cell.weight_hh))
        h, c = lstm_cell(gates, state.c)
        attended, weights = multi_head(self.query(h).unsqueeze(1), state.keys, state.values, self.heads)
        context = attention_on_attention(self.aoa, attended.squeeze(1), h)
        return AoAState(h, c, context, state.keys, state.values, state.image_gates, weights[:, :, 0].mean(dim=1))

    def teacher_forced(self, features: torch.Tensor, tokens: torch.Tensor, where: torch.Tensor) -> TeacherForced:
        outputs, alphas = unroll(self._advance, self._word_gates(tokens[:, :-1]), self.init_state(features),
                                 lambda state: state.context)
        return TeacherForced(self.output(self.dropout(outputs[where])), None, alphas)

    def step(self, tokens: torch.Tensor, state: AoAState) -> tuple[torch.Tensor, AoAState]:
        """The state carries this step's attention weights (the mean over heads)."""
        state = self._advance(self._word_gates(tokens), state)
        return self.output(self.dropout(state.context)), state

    @classmethod
    def from_config(cls, cfg, vocab_size: int, feature_dim: int) -> "AoA":
        return cls(vocab_size=vocab_size, feature_dim=feature_dim, embed_dim=cfg.embed_dim,
                   hidden_dim=cfg.hidden_dim, heads=cfg.heads, dropout=cfg.dropout, refine=cfg.refine,
                   refine_layers=cfg.refine_layers)
