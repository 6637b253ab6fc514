"""Loading a checkpoint written by training for inference: the decoder in eval mode, its
vocabulary and config, and the encoder it was trained with (``evaluate``, ``caption`` and
``Captioner``)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from omegaconf import OmegaConf

from captioner.data.vocab import Vocabulary
from captioner.encoding.encoders import run_encoder
from captioner.models import build_model
from captioner.training.checkpoint import (DECODER_KEYS, CheckpointError, checked_config, load_checkpoint, load_state,
                                           require, upgrade)


class Restored(NamedTuple):
    """A checkpoint loaded for inference: the model in eval mode, its vocabulary and config, and
    (when asked for) the encoder it was trained with."""

    model: torch.nn.Module
    vocab: Any
    config: Any
    encoder: Optional[torch.nn.Module] = None
    finetuned: bool = False  # the encoder carries fine-tuned weights (the feature cache does not describe it)


def restore_model(checkpoint: dict[str, Any] | str | Path, device: str | torch.device = "cpu",
                  with_encoder: bool = False) -> Restored:
    """A checkpoint written by training, ready to decode; with ``with_encoder`` also its encoder,
    frozen, carrying the checkpoint's fine-tuned weights when it has them."""
    path = checkpoint if isinstance(checkpoint, (str, Path)) else "the checkpoint"
    ckpt = load_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else upgrade(checkpoint)
    require(ckpt, path, DECODER_KEYS)
    cfg = checked_config(ckpt, path)
    vocab = Vocabulary.from_dict(ckpt["vocab"])
    check_weights_fit(cfg, len(vocab), ckpt, path)
    model = build_model(cfg.model, len(vocab), ckpt["feature_dim"])
    load_state(model, ckpt["model"], path, f"its own model config and {len(vocab)}-word vocabulary")
    encoder = restore_encoder(ckpt, cfg, device) if with_encoder else None
    return Restored(model.to(device).eval(), vocab, cfg, encoder, "encoder" in ckpt)


def check_weights_fit(cfg, vocab_size: int, ckpt: dict[str, Any], path) -> None:
    """One CheckpointError line unless the model the config describes has the checkpoint's weights'
    names and shapes, checked on the meta device: nothing is allocated, so a config that asks for
    a model of absurd size is refused before it can take the memory."""
    what = f"the model its own config describes ({len(ckpt['vocab'].get('itos', []))}-word vocabulary)"
    try:
        with torch.device("meta"):
            shell = build_model(cfg.model, vocab_size, int(ckpt["feature_dim"]))
    except (RuntimeError, ValueError, TypeError, OverflowError) as err:
        raise CheckpointError(f"{path} does not fit {what}: {(str(err).strip().splitlines() or ['?'])[-1]}") from None
    with warnings.catch_warnings():  # copying into meta tensors is a no-op: only the checks count
        warnings.simplefilter("ignore")
        load_state(shell, ckpt["model"], path, what)


def restore_encoder(ckpt: dict[str, Any], cfg, device: str | torch.device = "cpu"):
    """The checkpoint's encoder (frozen, eval mode): built from its config, then its fine-tuned
    weights loaded when it has them. Building draws random weights (pretrained=false, in tests)
    from the training seed, as training did, without touching the caller's random state."""
    enc = cfg.encoder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(OmegaConf.select(cfg, "train.seed", default=0)))
        encoder = run_encoder(cfg, pretrained=enc.pretrained and "encoder" not in ckpt,
                              weights=enc.weights if "encoder" not in ckpt else None)
    if "encoder" in ckpt:
        load_state(encoder, ckpt["encoder"], "the checkpoint's fine-tuned encoder", f"encoder {enc.name}")
    if encoder.feature_dim != int(ckpt["feature_dim"]):
        raise CheckpointError(f"encoder {enc.name} gives {encoder.feature_dim}-d features but the decoder "
                              f"expects {ckpt['feature_dim']}")
    return encoder.to(device).eval()
