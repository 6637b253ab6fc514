"""Self-describing checkpoints: config, vocabulary, weights, optimizer and progress as plain data.

Saved atomically (temporary file, then rename) and loaded with ``weights_only=True``, so a file
that carries pickled code is refused rather than executed.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from captioner.io import atomic_path


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unsafe or does not fit; the message says which and what to do."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (pass checkpoint=PATH to a .pt file written by training)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"refusing to load {path}: it contains objects other than plain data and tensors ({first}); "
            "only checkpoints written by captioner are accepted"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None


def restore_model(checkpoint: dict[str, Any] | str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, vocabulary, config) from a checkpoint written by training."""
    from omegaconf import OmegaConf

    from captioner.model import build_model
    from captioner.vocab import Vocabulary

    ckpt = load_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    missing = {"config", "vocab", "model", "feature_dim"} - set(ckpt)
    if missing:
        raise CheckpointError(f"not a captioner checkpoint: it lacks {', '.join(sorted(missing))}")
    cfg = OmegaConf.create(ckpt["config"])
    vocab = Vocabulary.from_dict(ckpt["vocab"])
    model = build_model(cfg.model, len(vocab), ckpt["feature_dim"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint weights do not fit its model config/vocabulary ({len(vocab)} words): "
            f"{str(err).splitlines()[-1].strip()}"
        ) from None
    return model.to(device).eval(), vocab, cfg
