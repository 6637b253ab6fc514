"""Decoders behind one registry keyed by ``model.name``.

Each module of this package defines one decoder: a subclass of ``captioner.models.base.Decoder``
(the contract: what a decoder writes and what it gets for free), decorated with
``@MODELS.register(name, Schema)`` where ``Schema`` is its config dataclass (a subclass of
``captioner.config.ModelConfig``); ``conf/model/<name>.yaml`` selects it. Adding a model is one
module here plus its config file.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from captioner.models.base import REQUIRED, Decoder
from captioner.registry import Registry

MODELS = Registry("model", __name__, Decoder, REQUIRED, "captioner/models/base.py")


def _model_class(model_cfg) -> type:
    return MODELS.get(model_cfg.get("name") or "show_tell")  # checkpoints written before model.name existed


def build_model(model_cfg, vocab_size: int, feature_dim: int) -> nn.Module:
    """The decoder a ``model`` config node describes."""
    return _model_class(model_cfg).from_config(model_cfg, vocab_size, feature_dim)


def reads_grid(model_cfg) -> bool:
    """Whether that decoder reads a grid of region features [B, regions, D] (attention) rather
    than one pooled vector [B, D]: what the encoder and the feature cache must give it."""
    return _model_class(model_cfg).reads_grid


def shape_keys(name: str) -> list[str]:
    """The fields of model ``name``'s schema that shape its weights (``shapes=True`` on the field):
    two checkpoints differing in one of them cannot load each other's weights."""
    return [f.name for f in dataclasses.fields(MODELS.schema(name or "show_tell")) if f.metadata.get("shapes")]
