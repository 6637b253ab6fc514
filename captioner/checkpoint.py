"""Self-describing checkpoints: config, vocabulary, weights, optimizer and progress as plain data.

Saved atomically (temporary file, then rename) and loaded with ``weights_only=True``, so a file
that carries pickled code is refused rather than executed.
"""
from __future__ import annotations

import logging
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from captioner.io import atomic_path

log = logging.getLogger("captioner.checkpoint")

LAST, BEST = "last.pt", "best.pt"


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
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it contains objects other than plain data and tensors "
            f"({_unpickling_reason(err)}); nothing in it was run. Only checkpoints written by captioner are accepted"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None


def _unpickling_reason(err: Exception) -> str:
    """The informative line of torch's weights-only refusal (not its advice to load unsafely)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if re.search(r"GLOBAL|[Uu]nsupported", line):
            return line.rstrip(".")
    return "not a weights-only file"


# --- training state -------------------------------------------------------------------------
# Everything below is stored as tensors, lists, numbers and strings, so weights_only loading
# accepts it: RNG states included (Python's is a tuple of ints, NumPy's an array).

def rng_state(device: Optional[torch.device] = None) -> dict[str, Any]:
    """The Python, NumPy, torch CPU (and this process's CUDA device) RNG states as plain data."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: Optional[torch.device] = None) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def resolve_resume(resume: Optional[str], out_dir: str | Path) -> Optional[Path]:
    """``train.resume``: None -> no resume; "auto" -> ``out_dir/last.pt`` if there is one; else a path."""
    if resume in (None, "", "none", "null"):
        return None
    if resume == "auto":
        path = Path(out_dir) / LAST
        if path.is_file():
            return path
        log.warning("train.resume=auto: no %s in %s, starting from scratch", LAST, out_dir)
        return None
    path = Path(resume)
    if path.is_dir():
        path = path / LAST
    if not path.is_file():
        raise CheckpointError(f"train.resume={resume}: no such checkpoint file "
                              "(give a last.pt/best.pt written by training, or auto)")
    return path


SHAPE_KEYS = ("inject", "cell", "num_layers", "embed_dim", "hidden_dim", "tie_embeddings")


def check_resumable(ckpt: dict[str, Any], path: str | Path, vocab_words: list[str], feature_dim: int,
                    model_cfg: dict) -> None:
    """One-line CheckpointError unless ``ckpt`` fits this run's vocabulary, features and model."""
    missing = {"config", "vocab", "model", "optimizer", "scheduler", "step", "epoch", "feature_dim"} - set(ckpt)
    if missing:
        raise CheckpointError(f"{path} is not a resumable captioner checkpoint: it lacks {', '.join(sorted(missing))}")
    saved = list(ckpt["vocab"]["itos"])
    if saved != list(vocab_words):
        diff = next((i for i, (a, b) in enumerate(zip(saved, vocab_words)) if a != b), min(len(saved), len(vocab_words)))
        where = (f"word {diff} is {saved[diff]!r} there, {vocab_words[diff]!r} here"
                 if diff < min(len(saved), len(vocab_words)) else "one is a prefix of the other")
        raise CheckpointError(
            f"{path} was trained with another vocabulary ({len(saved)} words; this data gives {len(vocab_words)}; "
            f"{where}): resume with the data and data.min_count it was trained on, or use a new train.out_dir")
    if int(ckpt["feature_dim"]) != int(feature_dim):
        encoder = ckpt["config"].get("encoder", {}).get("name", "?")
        raise CheckpointError(f"{path} was trained on {ckpt['feature_dim']}-d features (encoder={encoder}); "
                              f"this config gives {feature_dim}-d: use the same encoder")
    saved_model = ckpt["config"].get("model", {})
    changed = [f"model.{k}={saved_model.get(k)} there, {model_cfg.get(k)} here"
               for k in SHAPE_KEYS if k in saved_model and saved_model.get(k) != model_cfg.get(k)]
    if changed:
        raise CheckpointError(f"{path} has another model shape ({'; '.join(changed)}): "
                              "resume with the model settings it was trained with")


def restore_model(checkpoint: dict[str, Any] | str | Path, device: str | torch.device = "cpu",
                  with_encoder: bool = False):
    """(model in eval mode, vocabulary, config) from a checkpoint written by training; with
    ``with_encoder``, (model, vocabulary, config, encoder): the encoder it was trained with, frozen,
    carrying the checkpoint's fine-tuned weights when it has them (key ``encoder``)."""
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
    if not with_encoder:
        return model.to(device).eval(), vocab, cfg
    return model.to(device).eval(), vocab, cfg, restore_encoder(ckpt, cfg, device)


def restore_encoder(ckpt: dict[str, Any], cfg, device: str | torch.device = "cpu"):
    """The checkpoint's encoder (frozen, eval mode): built from its config, then its fine-tuned
    weights loaded when it has them. Building draws random weights (pretrained=false, in tests)
    from the training seed, as training did, without touching the caller's random state."""
    from omegaconf import OmegaConf

    from captioner.encoders import encoder_from_config

    enc = cfg.encoder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(OmegaConf.select(cfg, "train.seed", default=0)))
        encoder = encoder_from_config(enc, pretrained=enc.pretrained and "encoder" not in ckpt,
                                      weights=enc.weights if "encoder" not in ckpt else None)
    if "encoder" in ckpt:
        try:
            encoder.load_state_dict(ckpt["encoder"])
        except RuntimeError as err:
            raise CheckpointError(f"the checkpoint's encoder weights do not fit encoder {enc.name}: "
                                  f"{str(err).splitlines()[-1].strip()}") from None
    if encoder.feature_dim != int(ckpt["feature_dim"]):
        raise CheckpointError(f"encoder {enc.name} gives {encoder.feature_dim}-d features but the decoder "
                              f"expects {ckpt['feature_dim']}")
    return encoder.to(device).eval()
