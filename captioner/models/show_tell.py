"""The Show-and-Tell decoder: an image feature injected at the first step of a recurrent net.

``inject`` chooses how the image enters:
- ``first_input``: the projected feature is the input at step 0, then <bos> and the words
  (Vinyals et al. 2015).
- ``init_state``: the projected feature sets the initial hidden (and cell) state.
- ``first_step_bias``: the image term W_ih v is added to the first recurrent step's
  pre-activation only; since W_ih is linear this is the <bos> embedding plus the projected
  feature as the first input, so the fused cuDNN/oneDNN kernels still apply.
- ``every_step``: the projected feature is concatenated to every word's embedding ("par-inject"
  in Tanti et al. 2018), so the image cannot fade from the state over a long caption.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from captioner.config import ModelConfig, at_least, between, choice, shaping
from captioner.data.vocab import PAD_ID
from captioner.models import MODELS
from captioner.models.base import Decoder, TeacherForced

INJECT_MODES = ("first_input", "init_state", "first_step_bias", "every_step")
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


@dataclass
class ShowTellConfig(ModelConfig):
    name: str = "show_tell"
    inject: str = choice("first_input", INJECT_MODES, shapes=True)
    cell: str = choice("lstm", tuple(CELLS), shapes=True)
    num_layers: int = at_least(1, 1, shapes=True)
    embed_dim: int = at_least(256, 1, shapes=True)
    hidden_dim: int = at_least(512, 1, shapes=True)
    dropout: float = between(0.5, 0.0, 1.0)
    tie_embeddings: bool = shaping(False)  # output layer shares the word embedding (needs embed_dim == hidden_dim)

    @staticmethod
    def check(node) -> Optional[str]:
        if node.tie_embeddings and node.embed_dim != node.hidden_dim:
            return (f"tie_embeddings=true needs model.embed_dim == model.hidden_dim "
                    f"(got {node.embed_dim} and {node.hidden_dim})")
        return None


class DecoderState(NamedTuple):
    """Recurrent state between steps, batch first: ``hidden`` is the RNN's [B, layers, H] (a pair
    for an LSTM), None before the first step of the modes that inject at it; ``image_bias`` the
    image term still waiting to be added at the first word step; ``image`` the projected feature
    read with every word (``every_step``)."""

    hidden: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None
    image_bias: Optional[torch.Tensor] = None
    image: Optional[torch.Tensor] = None


def _layers_first(hidden):
    """Batch-first state <-> PyTorch's RNN layout [layers, B, H] (a transpose is its own inverse)."""
    if hidden is None:
        return None
    if isinstance(hidden, tuple):
        return tuple(h.transpose(0, 1).contiguous() for h in hidden)
    return hidden.transpose(0, 1).contiguous()


@MODELS.register("show_tell", ShowTellConfig)
class ShowTell(Decoder):
    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        embed_dim: int = 256,
        hidden_dim: int = 512,
        num_layers: int = 1,
        dropout: float = 0.5,
        cell: str = "lstm",
        inject: str = "first_input",
        pad_id: int = PAD_ID,
        tie_embeddings: bool = False,
    ):
        super().__init__(vocab_size, feature_dim)
        self.inject, self.cell, self.num_layers, self.hidden_dim = inject, cell, num_layers, hidden_dim

        if inject == "init_state":
            # one projection per layer for h, and another for c when the cell has one
            n_states = num_layers * (2 if cell == "lstm" else 1)
            self.image_proj = nn.Linear(feature_dim, n_states * hidden_dim)
        else:
            self.image_proj = nn.Linear(feature_dim, embed_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        rnn_input = 2 * embed_dim if inject == "every_step" else embed_dim  # every_step: [word; image]
        self.rnn = CELLS[cell](rnn_input, hidden_dim, num_layers, batch_first=True,
                               dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_dim, vocab_size)
        if tie_embeddings:
            # one matrix for reading and writing words (Press & Wolf 2017): fewer parameters to
            # overfit on small data sets such as Flickr8k
            self.output.weight = self.embed.weight
            # nn.Embedding's N(0, 1) would start the logits at a scale of sqrt(hidden_dim)
            nn.init.normal_(self.embed.weight, std=embed_dim ** -0.5)
            with torch.no_grad():
                self.embed.weight[pad_id].zero_()

    def init_state(self, features: torch.Tensor) -> DecoderState:
        """State ready to read <bos>: the image has been injected."""
        projected = self.image_proj(self.dropout(features))
        if self.inject == "init_state":
            states = torch.tanh(projected).view(features.size(0), -1, self.num_layers, self.hidden_dim)
            states = states.transpose(0, 1)  # [n_states, B, layers, H]
            return DecoderState((states[0], states[1]) if self.cell == "lstm" else states[0])
        if self.inject == "first_step_bias":
            return DecoderState(None, image_bias=projected)
        if self.inject == "every_step":
            return DecoderState(None, image=projected)
        _, hidden = self.rnn(projected.unsqueeze(1))
        return DecoderState(_layers_first(hidden))

    def _run(self, inputs: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState]:
        if state.image_bias is not None:
            inputs = torch.cat([inputs[:, :1] + state.image_bias.unsqueeze(1), inputs[:, 1:]], dim=1)
        if state.image is not None:
            inputs = torch.cat([inputs, state.image.unsqueeze(1).expand(-1, inputs.size(1), -1)], dim=2)
        out, hidden = self.rnn(inputs, _layers_first(state.hidden))
        return out, DecoderState(_layers_first(hidden), image=state.image)

    def teacher_forced(self, features: torch.Tensor, tokens: torch.Tensor, where: torch.Tensor) -> TeacherForced:
        """The real positions are gathered before dropout and the output layer (the largest
        matmul at COCO vocabulary size), so padding costs nothing there. The recurrent net runs
        over the batch's padded length (one fused cuDNN/oneDNN call); batches are trimmed to
        their longest caption. At COCO size the padding left inside a mixed 8-16 word batch cost
        a few percent of a CPU step, and packed sequences saved nothing measurable there
        (``scripts/bench_train.py``)."""
        out, _ = self._run(self.embed(tokens[:, :-1]), self.init_state(features))
        return TeacherForced(self.output(self.dropout(out[where])))

    def step(self, tokens: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState]:
        out, state = self._run(self.embed(tokens).unsqueeze(1), state)
        return self.output(self.dropout(out[:, 0])), state

    @classmethod
    def from_config(cls, cfg, vocab_size: int, feature_dim: int) -> "ShowTell":
        return cls(vocab_size=vocab_size, feature_dim=feature_dim, embed_dim=cfg.embed_dim, hidden_dim=cfg.hidden_dim,
                   num_layers=cfg.num_layers, dropout=cfg.dropout, cell=cfg.cell, inject=cfg.inject,
                   tie_embeddings=cfg.get("tie_embeddings", False))  # .get: checkpoints from before the option
