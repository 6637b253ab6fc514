"""The decoder contract: what every decoder provides, written once.

A decoder is a subclass of ``Decoder`` registered with ``@MODELS.register(name, Schema)``. It
writes four things:

- ``init_state(features) -> state``: the state ready to read ``<bos>``, from a batch of image
  features (pooled [B, D], or region grids [B, R, D] when the class sets ``reads_grid = True``).
  A state is a NamedTuple whose fields are tensors with the batch in dim 0, tuples of them, or
  None, so ``reorder_state`` can follow beam back-pointers for every decoder.
- ``step(tokens, state) -> (logits, state)``: the next-token logits [B, V] after ``tokens`` [B].
- ``teacher_forced(features, tokens, where) -> TeacherForced``: for captions ``tokens`` [B, T]
  (``<bos> w1 .. wn <eos>``, padded), the logits predicting ``tokens[:, 1:]`` from
  ``tokens[:, :-1]`` at the positions the mask ``where`` [B, T-1] selects, as [n, V] in row-major
  order (a model may compute the output layer only there: padding then costs nothing), plus any
  loss terms of its own (``penalty``) and, when the class sets ``attends = True``, the attention
  weights [B, T-1, R] it gave the regions before predicting each token.
- ``from_config(cfg, vocab_size, feature_dim)``: the decoder a ``model`` config node describes.

Everything else is shared and implemented here: ``next_logprobs`` and ``reorder_state`` (the
decoding protocol of ``captioner.decoding``), ``generate``, ``sequence_logprobs`` (for SCST),
``attention_maps`` (for a class that declares ``attends``) and ``forward``. Objectives reach the
per-token logits and the model's own loss terms through ``teacher_forced``. A class that lacks one
of the four, or does not subclass ``Decoder``, fails when it registers (``captioner.registry``),
before any data or training work.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from captioner.data.vocab import PAD_ID
from captioner.decoding.search import DecodeOutput, generate, without_banned


class TeacherForced(NamedTuple):
    """What ``Decoder.teacher_forced`` returns."""

    logits: torch.Tensor  # [n, V] at the positions ``where`` selects, row-major
    penalty: Optional[torch.Tensor] = None  # the model's own loss terms (weighted, a scalar: a mean over rows), or None
    attention: Optional[torch.Tensor] = None  # [B, T-1, R] (``attends``), over every position


def target_positions(tokens: torch.Tensor) -> torch.Tensor:
    """The mask [B, T-1] of the real target tokens of captions ``tokens`` [B, T] (not padding)."""
    return tokens[:, 1:] != PAD_ID


def caption_logprobs(logits: torch.Tensor, targets: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Sum per caption [B] of the log-probabilities of its target tokens: ``logits`` [n, V] and
    ``targets`` [n] are the positions where ``where`` [B, T-1] is true, in row-major order."""
    token_logprobs = -F.cross_entropy(logits.float(), targets, reduction="none")
    rows = torch.arange(where.size(0), device=where.device)[:, None].expand_as(where)[where]
    return torch.zeros(where.size(0), device=where.device).index_add_(0, rows, token_logprobs)


def select_rows(value: Any, index: torch.Tensor) -> Any:
    """``value`` (a tensor with the batch in dim 0, a tuple or NamedTuple of such values, or None)
    with its batch rows ``index`` (selected and repeated)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index)
    rows = [select_rows(v, index) for v in value]
    return type(value)(*rows) if hasattr(value, "_fields") else tuple(rows)


class Decoder(nn.Module):
    """The base class of every decoder; see the module docstring for the contract."""

    reads_grid: bool = False  # features: one pooled vector [B, D] (False) or region grids [B, R, D]
    attends: bool = False  # teacher_forced returns attention weights over the regions

    def __init__(self, vocab_size: int, feature_dim: int):
        super().__init__()
        self.vocab_size, self.feature_dim = vocab_size, feature_dim  # what ensembles check members by

    # -- written by each decoder -------------------------------------------------------------
    def init_state(self, features: torch.Tensor) -> Any:
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def teacher_forced(self, features: torch.Tensor, tokens: torch.Tensor, where: torch.Tensor) -> TeacherForced:
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg, vocab_size: int, feature_dim: int) -> "Decoder":
        raise NotImplementedError

    # -- shared: the decoding protocol -------------------------------------------------------
    def next_logprobs(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """Log-probabilities [B, V] of the next token after ``tokens`` [B], and the new state."""
        logits, state = self.step(tokens, state)
        return F.log_softmax(logits, dim=-1), state

    def reorder_state(self, state: Any, index: torch.Tensor) -> Any:
        """Select (and repeat) batch rows of the state, e.g. to follow beam back-pointers."""
        return select_rows(state, index)

    @torch.no_grad()
    def generate(self, features: torch.Tensor, method: str = "greedy", **options) -> DecodeOutput:
        """Captions for a batch of image features; see ``captioner.decoding.search``."""
        return generate(self, features, method=method, **options)

    # -- shared: teacher forcing -------------------------------------------------------------
    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, T-1, V] predicting tokens[:, 1:] from tokens[:, :-1], at every position."""
        where = torch.ones_like(tokens[:, 1:], dtype=torch.bool)
        return self.teacher_forced(features, tokens, where).logits.view(*where.shape, -1)

    def sequence_logprobs(self, features: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                          max_length: Optional[int] = None, ban_unk: bool = False) -> torch.Tensor:
        """log p(caption | image) [B] of each row of ``tokens`` (<bos> w1 .. wn <eos>, padded),
        <eos> included, in one teacher-forced pass; with ``temperature``, under the distribution
        whose logits are divided by it. With ``max_length`` (and ``ban_unk``), under the
        distribution ``decoding.search.draw`` samples from with those settings: the tokens it
        never emits (<pad>, <bos>, <unk> when banned; all but <eos> once a caption is full) are
        left out and the rest renormalized, so the policy gradient of SCST is exact."""
        where = target_positions(tokens)
        logits = self.teacher_forced(features, tokens, where).logits.float()
        if temperature != 1.0:
            logits = logits / temperature
        if max_length is not None:
            words = torch.arange(where.size(1), device=where.device).expand_as(where)[where]
            logits = without_banned(logits, words, max_length, ban_unk)
        return caption_logprobs(logits, tokens[:, 1:][where], where)

    @torch.no_grad()
    def attention_maps(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The weights [B, T-1, R] the model gave the regions before predicting each of tokens[:, 1:]."""
        if not self.attends:
            raise TypeError(f"{type(self).__name__} does not attend over image regions (attends = False)")
        nowhere = torch.zeros_like(tokens[:, 1:], dtype=torch.bool)  # no logits needed
        return self.teacher_forced(features, tokens, nowhere).attention


REQUIRED = ("init_state", "step", "teacher_forced", "from_config")  # what each decoder writes
