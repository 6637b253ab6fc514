"""The checkpoint format, owned here: writing, reading, resuming and loading for inference.

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
import logging
import math
import os
import pickle
import random
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

from captioner.io import WriteError, atomic_path

log = logging.getLogger("captioner.checkpoint")

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
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None
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


# --- training state -------------------------------------------------------------------------
# Everything below is stored as tensors, lists, numbers and strings, so weights_only loading
# accepts it: RNG states included (Python's is a tuple of ints, NumPy's an array).

@dataclass
class TrainState:
    """Where a run is, all plain data: what a checkpoint needs beyond the weights to resume exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed (evaluated and logged)
    batch: int = 0  # batches done in the epoch in progress
    loss_sum: float = 0.0  # that epoch's sum of loss x weight so far
    weight: int = 0  # and its weight (tokens, for cross-entropy)
    seconds: float = 0.0  # and its time so far
    figure_sums: dict = field(default_factory=dict)  # and its objective's figures x weight (SCST's reward, ...)
    best: float = -math.inf  # best value of train.monitor
    history: list = field(default_factory=list)  # one row per completed epoch, as in metrics.jsonl

    def end_epoch(self, row: dict, value: float) -> bool:
        """Record a finished epoch's row and monitored value; whether it is the best so far."""
        improved = value > self.best
        self.best = max(self.best, value)
        self.history.append(row)
        self.epoch, self.batch, self.loss_sum, self.weight, self.seconds = self.epoch + 1, 0, 0.0, 0, 0.0
        self.figure_sums = {}
        return improved


def training_checkpoint(*, config: dict, vocab, feature_dim: int, state: TrainState, model, optimizer, scheduler,
                        precision, rng: list, world_size: int, encoder=None, average=None) -> dict[str, Any]:
    """Everything needed to go on from ``state`` (and, as ``model``, the weights to decode with:
    the moving average when there is one)."""
    ckpt = {"format": FORMAT, "config": config, "vocab": vocab.to_dict(), "feature_dim": feature_dim,
            "model": (average.model if average is not None else model).state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": precision.state_dict(),
            "step": state.step, "epoch": state.epoch, "batch": state.batch,
            "epoch_loss": {"sum": state.loss_sum, "tokens": state.weight, "seconds": state.seconds,
                           "figures": dict(state.figure_sums)},
            "best_metric": state.best, "metrics": state.history[-1] if state.history else None,
            "history": list(state.history), "rng": rng, "world_size": world_size}
    if encoder is not None:  # fine-tuned: the cached features no longer describe it, so it travels along
        ckpt["encoder"] = encoder.state_dict()
    if average is not None:  # resuming needs the trained weights as well as their average
        ckpt["trained_model"], ckpt["ema_updates"] = model.state_dict(), average.updates
    return ckpt


def restore_training(ckpt: dict[str, Any], path, cfg, *, rank: int, world_size: int, device, model, optimizer,
                     scheduler, precision, vocab, feature_dim: int, encoder=None, average=None) -> TrainState:
    """Load a checkpoint's weights, optimizer, scheduler, loss scale and RNG streams into this
    run's objects (after checking that it fits them); return where it stopped."""
    from omegaconf import OmegaConf

    check_resumable(ckpt, path, vocab.itos, feature_dim, OmegaConf.to_container(cfg.model, resolve=True))
    try:
        model.load_state_dict(ckpt.get("trained_model", ckpt["model"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if encoder is not None and "encoder" in ckpt:
            encoder.load_state_dict(ckpt["encoder"])  # fine-tuned weights (the optimizer has their group)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path} does not fit this model: {str(err).strip().splitlines()[-1].strip()}") from None
    if average is not None:  # a checkpoint without an average starts one from its weights
        average.model.load_state_dict(ckpt["model"])
        average.updates = int(ckpt.get("ema_updates", 0))
    precision.load_state_dict(ckpt.get("scaler") or {})
    saved_train = ckpt["config"].get("train", {})
    changed = [f"train.{k}={cfg.train[k]} (checkpoint: {saved_train[k]})" for k in ("batch_size", "seed")
               if k in saved_train and saved_train[k] != cfg.train[k]]
    if changed:
        log.warning("resuming with %s: the run goes on, but not as the original run would have", ", ".join(changed))
    epoch_loss = ckpt.get("epoch_loss") or {}
    state = TrainState(step=int(ckpt["step"]), epoch=int(ckpt["epoch"]), batch=int(ckpt.get("batch", 0)),
                       loss_sum=float(epoch_loss.get("sum", 0.0)), weight=int(epoch_loss.get("tokens", 0)),
                       seconds=float(epoch_loss.get("seconds", 0.0)),
                       figure_sums=dict(epoch_loss.get("figures") or {}),
                       best=float(ckpt.get("best_metric", -math.inf)),
                       history=list(ckpt.get("history") or ([ckpt["metrics"]] if ckpt.get("metrics") else [])))
    rng = ckpt.get("rng")
    if isinstance(rng, list) and len(rng) == world_size:
        set_rng_state(rng[rank], device)
    else:
        log.warning("%s holds no random state for %d process(es): dropout is re-seeded, so the resumed run is "
                    "not bit-identical to an uninterrupted one", path, world_size)
        torch.manual_seed(int(cfg.train.seed) * 1000003 + state.step * 101 + rank)
    return state

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


SHAPE_KEYS = ("name", "inject", "cell", "num_layers", "embed_dim", "hidden_dim", "tie_embeddings")


def load_weights(ckpt: dict[str, Any], path: str | Path, model, feature_dim: int, model_cfg: dict) -> None:
    """``train.init_from``: the checkpoint's decoder weights (what it decodes with) into ``model``,
    after checking that they fit this run's features and model."""
    missing = {"config", "vocab", "model", "feature_dim"} - set(ckpt)
    if missing:
        raise CheckpointError(f"{path} is not a captioner checkpoint: it lacks {', '.join(sorted(missing))}")
    check_fits(ckpt, path, feature_dim, model_cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit this model: {str(err).strip().splitlines()[-1].strip()}") from None


def check_fits(ckpt: dict[str, Any], path: str | Path, feature_dim: int, model_cfg: dict) -> None:
    """One-line CheckpointError unless ``ckpt`` was trained on features of ``feature_dim`` with a
    model of the shape ``model_cfg`` describes."""
    if int(ckpt["feature_dim"]) != int(feature_dim):
        encoder = ckpt["config"].get("encoder", {}).get("name", "?")
        raise CheckpointError(f"{path} was trained on {ckpt['feature_dim']}-d features (encoder={encoder}); "
                              f"this config gives {feature_dim}-d: use the same encoder")
    saved_model = ckpt["config"].get("model", {})
    changed = [f"model.{k}={saved_model.get(k)} there, {model_cfg.get(k)} here"
               for k in SHAPE_KEYS if k in saved_model and saved_model.get(k) != model_cfg.get(k)]
    if changed:
        raise CheckpointError(f"{path} has another model shape ({'; '.join(changed)}): "
                              "use the model settings it was trained with")


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
    check_fits(ckpt, path, feature_dim, model_cfg)


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
    from omegaconf import OmegaConf

    from captioner.models import build_model
    from captioner.vocab import Vocabulary

    ckpt = load_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else upgrade(checkpoint)
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
    encoder = restore_encoder(ckpt, cfg, device) if with_encoder else None
    return Restored(model.to(device).eval(), vocab, cfg, encoder, "encoder" in ckpt)


def restore_encoder(ckpt: dict[str, Any], cfg, device: str | torch.device = "cpu"):
    """The checkpoint's encoder (frozen, eval mode): built from its config, then its fine-tuned
    weights loaded when it has them. Building draws random weights (pretrained=false, in tests)
    from the training seed, as training did, without touching the caller's random state."""
    from omegaconf import OmegaConf

    from captioner.encoders import run_encoder

    enc = cfg.encoder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(OmegaConf.select(cfg, "train.seed", default=0)))
        encoder = run_encoder(cfg, pretrained=enc.pretrained and "encoder" not in ckpt,
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
