"""Decoders behind one registry keyed by ``model.name``.

Each module of this package defines one decoder class, decorated with
``@MODELS.register(name, Schema)`` where ``Schema`` is its config dataclass (a subclass of
``captioner.config.ModelConfig``); ``conf/model/<name>.yaml`` selects it. Every decoder speaks
the one-step decoding protocol (``init_state`` / ``step`` / ``reorder_state``), has
``loss(features, tokens, label_smoothing)`` for teacher forcing, ``from_config(cfg,
vocab_size, feature_dim)`` and ``reads_grid`` (pooled [B, D] or region [B, regions, D]
features), so decoding, objectives, ensembles and checkpoints work for each unchanged. Adding a model is one module here plus its config file.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from captioner.registry import Registry

MODELS = Registry("model", __name__)


def _model_class(model_cfg) -> type:
    return MODELS.get(model_cfg.get("name") or "show_tell")  # checkpoints written before model.name existed


def build_model(model_cfg, vocab_size: int, feature_dim: int) -> nn.Module:
    """The decoder a ``model`` config node describes."""
    return _model_class(model_cfg).from_config(model_cfg, vocab_size, feature_dim)


def caption_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    """Sum per caption [B] of the log-probabilities of its real target tokens: ``logits`` [n, V]
    and ``targets`` [n] are the positions where ``mask`` [B, T] is true, in row-major order."""
    token_logprobs = -F.cross_entropy(logits.float() / temperature, targets, reduction="none")
    rows = torch.arange(mask.size(0), device=mask.device)[:, None].expand_as(mask)[mask]
    return torch.zeros(mask.size(0), device=mask.device).index_add_(0, rows, token_logprobs)


def reads_grid(model_cfg) -> bool:
    """Whether that decoder reads a grid of region features [B, regions, D] (attention) rather
    than one pooled vector [B, D]: what the encoder and the feature cache must give it."""
    return _model_class(model_cfg).reads_grid
