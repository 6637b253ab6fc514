"""Where a training run starts: from scratch, resumed exactly from its own ``last.pt``
(``train.resume``), or from another run's weights (``train.init_from``); and ``TrainState``,
where a run is, which every checkpoint carries beside the weights."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from captioner.training.checkpoint import (DECODER_KEYS, FORMAT, LAST, RESUME_KEYS, CheckpointError, check_fits,
                                           check_vocabulary, load_state, require)
from captioner.training.rng import set_rng_state

log = logging.getLogger("captioner.training.resume")


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
    require(ckpt, path, RESUME_KEYS, "resumable captioner")
    check_vocabulary(ckpt, path, vocab.itos)
    check_fits(ckpt, path, feature_dim, OmegaConf.to_container(cfg.model, resolve=True))
    load_state(model, ckpt.get("trained_model", ckpt["model"]), path)
    load_state(optimizer, ckpt["optimizer"], path)
    load_state(scheduler, ckpt["scheduler"], path)
    if encoder is not None and "encoder" in ckpt:
        load_state(encoder, ckpt["encoder"], path)  # fine-tuned weights (the optimizer has their group)
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


def resume_requested(resume: Optional[str]) -> bool:
    """Whether ``train.resume`` asks to go on from a checkpoint (a path, or auto)."""
    return resume not in (None, "", "none", "null")


def resolve_resume(resume: Optional[str], out_dir: str | Path) -> Optional[Path]:
    """``train.resume``: None -> no resume; "auto" -> ``out_dir/last.pt`` if there is one; else a path."""
    if not resume_requested(resume):
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


def load_weights(ckpt: dict[str, Any], path: str | Path, model, feature_dim: int, model_cfg: dict) -> None:
    """``train.init_from``: the checkpoint's decoder weights (what it decodes with) into ``model``,
    after checking that they fit this run's features and model."""
    require(ckpt, path, DECODER_KEYS)
    check_fits(ckpt, path, feature_dim, model_cfg)
    load_state(model, ckpt["model"], path)
