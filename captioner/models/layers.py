"""The pieces several decoders share, as functions of their tensors and layers.

The parameters stay in each decoder (``region_key``, ``hidden_query``, ``score``, its cells), so
their names in checkpoints are the decoder's own; what is written once here is the arithmetic.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


def additive_attention(keys: torch.Tensor, query: torch.Tensor, score: nn.Linear,
                       regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bahdanau attention over the regions [B, R, D], from their keys [B, R, A] (W_r r_i, once
    per image) and a query [B, A] (W_h h): weights alpha = softmax_i(w . tanh(W_r r_i + W_h h))
    [B, R] and the context sum_i alpha_i r_i [B, D], returned as (context, alpha)."""
    energy = score(torch.tanh(keys + query.unsqueeze(1))).squeeze(2)
    alpha = energy.softmax(dim=1)
    return torch.bmm(alpha.unsqueeze(1), regions).squeeze(1), alpha


def lstm_cell(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.LSTMCell's arithmetic on its summed pre-activations [B, 4H] (i, f, g, o) and the
    previous cell [B, H]: (h, c). Decoders that split a cell's input by where each part changes
    (per image, per caption, per word) sum the parts' shares themselves and finish here."""
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def unroll(advance: Callable[[torch.Tensor, Any], Any], word_gates: torch.Tensor, state: Any,
           output: Callable[[Any], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing of an attention decoder: ``advance`` the state over every position of
    ``word_gates`` [B, T, G] (each word's share of the gates, computed in bulk), collecting what
    ``output`` reads from each state [B, T, H] and each state's ``attention`` [B, T, R]."""
    outputs, alphas = [], []
    for t in range(word_gates.size(1)):
        state = advance(word_gates[:, t], state)
        outputs.append(output(state))
        alphas.append(state.attention)
    return torch.stack(outputs, dim=1), torch.stack(alphas, dim=1)
