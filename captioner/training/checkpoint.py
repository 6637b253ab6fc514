"""The checkpoint format, owned here: writing and reading a file, upgrading older formats, and the
checks that a checkpoint fits the run or model it is loaded into (``captioner.training.resume``
resumes from one, ``captioner.training.restore`` loads one for inference).

A checkpoint describes itself: config, vocabulary, weights, optimizer and progress as plain data,
with its ``format`` number. Saved atomically (temporary file, then rename) and loaded with
``weights_only=True``, so a file that carries pickled code is refused rather than executed.

Formats: 1 weights, config, vocabulary, optimizer, step; 2 + batch, epoch_loss, history, rng,
scaler, world_size (exact resume); 3 + ``model.name`` and the ``objective`` config group (label
smoothing moved from ``model`` to ``objective``). Older files are read as the current format.
"""
from __future__ import annotations

import copy
import errno
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from captioner.config import TrainRunConfig, validate
from captioner.io import WriteError, atomic_path
from captioner.models import MODELS, shape_keys
from captioner.objectives import OBJECTIVES

LAST, BEST = "last.pt", "best.pt"
FORMAT = 3


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unsafe or does not fit; the message says which and what to do."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: on any failure (a full disk) the previous file stays
    and the error is one ``WriteError`` naming the file and the reason."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as err:  # its zip writer reports a short write as "unexpected pos ..."
            f.flush()  # a full disk shows here as the OSError it is (atomic_path says so)
            os.fsync(f.fileno())
            reason = os.strerror(errno.ENOSPC) if shutil.disk_usage(Path(tmp).parent).free == 0 else \
                str(err).splitlines()[0]
            raise WriteError(path, reason) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint as plain data, in the current format (older formats are upgraded)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (pass checkpoint=PATH to a .pt file written by training)")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it contains objects other than plain data and tensors "
            f"({_unpickling_reason(err)}); nothing in it was run. Only checkpoints written by captioner are accepted"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError) as err:  # (an empty file: no message)
        reason = (str(err).strip().splitlines() or [f"{type(err).__name__}, {path.stat().st_size} bytes"])[0]
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a captioner checkpoint (it holds a {type(ckpt).__name__})")
    return upgrade(ckpt, path)


def upgrade(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> dict[str, Any]:
    """``ckpt`` in the current format; a file from a newer captioner is refused with one line."""
    version = int(ckpt.get("format", 1))
    if version > FORMAT:
        raise CheckpointError(f"{path} was written by a newer captioner (checkpoint format {version}; this "
                              f"version reads formats up to {FORMAT}): upgrade captioner to load it")
    if version < 3 and isinstance(ckpt.get("config"), dict):
        config = copy.deepcopy(ckpt["config"])
        model = config.setdefault("model", {})
        model.setdefault("name", "show_tell")
        config.setdefault("objective", {"name": "cross_entropy",
                                        "label_smoothing": model.pop("label_smoothing", 0.0)})
        ckpt = {**ckpt, "config": config, "format": FORMAT}
    return ckpt


def _unpickling_reason(err: Exception) -> str:
    """The informative line of torch's weights-only refusal (not its advice to load unsafely)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if re.search(r"GLOBAL|[Uu]nsupported", line):
            return line.rstrip(".")
    return "not a weights-only file"


# --- does it fit? ------------------------------------------------------------------------------
# What a checkpoint holds is checked before it is used, each check written once here.

DECODER_KEYS = ("config", "vocab", "model", "feature_dim")  # enough to decode with
RESUME_KEYS = DECODER_KEYS + ("optimizer", "scheduler", "step", "epoch")  # enough to go on training


def require(ckpt: dict[str, Any], path: str | Path, keys: Iterable[str], what: str = "captioner") -> None:
    """One-line CheckpointError unless ``ckpt`` holds every one of ``keys``."""
    missing = set(keys) - set(ckpt)
    if missing:
        raise CheckpointError(f"{path} is not a {what} checkpoint: it lacks {', '.join(sorted(missing))}")


def load_state(module: torch.nn.Module, state: dict[str, Any], path: str | Path, what: str = "this model") -> None:
    """``module.load_state_dict(state)``, a mismatch being one CheckpointError line naming ``path``."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path} does not fit {what}: {str(err).strip().splitlines()[-1].strip()}") from None


def checked_config(ckpt: dict[str, Any], path: str | Path) -> DictConfig:
    """The checkpoint's config as a command line's would be: typed by the same schemas (the model's
    and the objective's by their names) and validated, before anything is built from it. A config
    that is no mapping, an unknown choice or key, a wrong type or a value out of range is one
    CheckpointError line naming the key."""
    config = ckpt.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a captioner checkpoint: its config is a {type(config).__name__}, "
                              "not a mapping")
    try:
        cfg = OmegaConf.structured(TrainRunConfig)
        model, objective = config.get("model") or {}, config.get("objective") or {}
        cfg.model = OmegaConf.structured(MODELS.schema(str(model.get("name") or "show_tell")))
        cfg.objective = OmegaConf.structured(OBJECTIVES.schema(str(objective.get("name") or "cross_entropy")))
        cfg = OmegaConf.merge(cfg, config)
        validate(cfg)
    except (ValueError, OmegaConfBaseException, AttributeError) as err:
        key = getattr(err, "full_key", None)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path} holds a config this captioner refuses ({f'{key}: ' if key else ''}{first}): "
                              "it was not written by a matching captioner, or was changed since") from None
    return cfg


def check_fits(ckpt: dict[str, Any], path: str | Path, feature_dim: int, model_cfg: dict) -> None:
    """One-line CheckpointError unless ``ckpt`` was trained on features of ``feature_dim`` with a
    model of the shape ``model_cfg`` describes: the same ``model.name`` and the same value of every
    field its schema marks as shaping the weights."""
    if int(ckpt["feature_dim"]) != int(feature_dim):
        encoder = ckpt["config"].get("encoder", {}).get("name", "?")
        raise CheckpointError(f"{path} was trained on {ckpt['feature_dim']}-d features (encoder={encoder}); "
                              f"this config gives {feature_dim}-d: use the same encoder")
    saved_model = ckpt["config"].get("model", {})
    if saved_model.get("name") != model_cfg.get("name"):
        raise CheckpointError(f"{path} holds another decoder (model.name={saved_model.get('name')} there, "
                              f"{model_cfg.get('name')} here): use model={saved_model.get('name')}")
    changed = [f"model.{k}={saved_model.get(k)} there, {model_cfg.get(k)} here"
               for k in shape_keys(model_cfg.get("name")) if k in saved_model and saved_model.get(k) != model_cfg.get(k)]
    if changed:
        raise CheckpointError(f"{path} has another model shape ({'; '.join(changed)}): "
                              "use the model settings it was trained with")


def check_vocabulary(ckpt: dict[str, Any], path: str | Path, vocab_words: list[str]) -> None:
    """One-line CheckpointError unless ``ckpt`` was trained with the vocabulary ``vocab_words``."""
    saved = list(ckpt["vocab"]["itos"])
    if saved == list(vocab_words):
        return
    diff = next((i for i, (a, b) in enumerate(zip(saved, vocab_words)) if a != b), min(len(saved), len(vocab_words)))
    where = (f"word {diff} is {saved[diff]!r} there, {vocab_words[diff]!r} here"
             if diff < min(len(saved), len(vocab_words)) else "one is a prefix of the other")
    raise CheckpointError(
        f"{path} was trained with another vocabulary ({len(saved)} words; this data gives {len(vocab_words)}; "
        f"{where}): resume with the data and data.min_count it was trained on, or use a new train.out_dir")


def named_by(config: DictConfig, path: str | Path) -> bool:
    """Whether ``path`` lies at or under a location the checkpoint's ``config`` names (its
    ``data.root``, its ``encoder.cache_dir``). A checkpoint may come from anyone: what it names is
    only ever read, never written (relative names resolve against the working directory, as on
    the command line)."""
    named = [OmegaConf.select(config, key) for key in ("data.root", "encoder.cache_dir")]
    target = Path(path).resolve()
    return any(target == Path(p).resolve() or Path(p).resolve() in target.parents for p in named if p)
