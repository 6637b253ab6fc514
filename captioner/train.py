"""python -m captioner.train [overrides]: train a captioner; Hydra composes the config from conf/.

``main`` is a thin Hydra entry; ``train(cfg)`` does the work and returns the final metrics, so
tests compose the real config with small overrides and call it directly.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from captioner import distributed
from captioner.checkpoint import (BEST, LAST, CheckpointError, check_resumable, load_checkpoint, resolve_resume,
                                  rng_state, save_checkpoint, set_rng_state)
from captioner.cli import Interrupted, known_errors, run
from captioner.config import CONF_DIR
from captioner.datasets import load_records
from captioner.ema import WeightAverage
from captioner.encoders import encoder_from_config
from captioner.engine import CaptionBatches, evaluate, train_one_epoch
from captioner.features import Normalize, all_split_features, compute_features
from captioner.io import atomic_write, atomic_write_text
from captioner.model import build_model
from captioner.precision import Precision, adam_options, compile_loss
from captioner.vocab import Vocabulary

log = logging.getLogger("captioner.train")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use cpu or auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_scheduler(optimizer, optim_cfg, steps_per_epoch: int, total_steps: int):
    warmup = max(optim_cfg.warmup_steps, 0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim_cfg.schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))
        if optim_cfg.schedule == "step":
            return optim_cfg.gamma ** (step // max(1, optim_cfg.step_epochs * steps_per_epoch))
        if optim_cfg.schedule == "constant":
            return 1.0
        raise ValueError(f"optim.schedule={optim_cfg.schedule!r}: choose cosine, step or constant")

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def feature_cache_dir(data_cfg, encoder_cfg) -> Path:
    return Path(encoder_cfg.cache_dir or Path(data_cfg.root) / "features")


def plot_history(history: list[dict], path: Path, monitor: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax1 = plt.subplots(figsize=(6, 4))
    ax1.plot(epochs, [h["train/loss"] for h in history], "o-", color="tab:blue", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss (per token)", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(epochs, [h.get(f"val/{monitor}") for h in history], "s-", color="tab:red", label=f"val {monitor}")
    ax2.set_ylabel(f"val {monitor} (0-1)", color="tab:red")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


@dataclass
class TrainState:
    """Where a run is, all plain data: what a checkpoint needs beyond the weights to resume exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed (evaluated and logged)
    batch: int = 0  # batches done in the epoch in progress
    loss_sum: float = 0.0  # that epoch's sum of loss x tokens so far
    tokens: int = 0  # and its token count
    seconds: float = 0.0  # and its time so far
    best: float = -math.inf  # best value of train.monitor
    history: list = field(default_factory=list)  # one row per completed epoch, as in metrics.jsonl


class StopSignals:
    """SIGINT/SIGTERM while training ask the loop to stop at the next step boundary, after saving
    ``last.pt``; before the loop (or a second signal more than 2 s later) they stop at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.armed = False
        self.phase = "before training started"  # said when a signal stops the run outside the loop
        self._first = 0.0
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not self.armed:
            raise Interrupted(signum, f"interrupted ({name}) {self.phase}")
        if self.signum is None:
            self.signum, self._first = signum, time.monotonic()
            log.warning("%s: stopping after this step, saving last.pt first (again to stop at once)", name)
        elif time.monotonic() - self._first > 2.0:  # quick repeats are a launcher passing it on
            raise Interrupted(signum, f"interrupted again ({name}): stopped without saving the current step")


def drop_empty_captions(records: dict[str, list]) -> dict[str, list]:
    """Captions with no words (empty, blank, punctuation only) are dropped, counted in a warning;
    so are images left with none (nothing to learn from or score against)."""
    from captioner.datasets import ImageRecord
    from captioner.tokenizer import tokenize

    cleaned = {}
    for split, recs in records.items():
        kept, empty, bare = [], 0, []
        for r in recs:
            captions = [c for c in r.captions if isinstance(c, str) and tokenize(c)]
            empty += len(r.captions) - len(captions)
            if captions:
                kept.append(r if len(captions) == len(r.captions) else ImageRecord(r.image_id, r.path, captions))
            else:
                bare.append(r.path)
        if empty:
            log.warning("split %s: skipped %d empty caption(s)%s", split, empty,
                        f"; {len(bare)} image(s) had no other caption and are skipped too (e.g. {bare[0]})"
                        if bare else "")
        cleaned[split] = kept
    return cleaned


def write_metrics(path: Path, history: list[dict]) -> None:
    """metrics.jsonl rewritten whole and atomically: one row per completed epoch, never a torn line
    nor, after a resume, a repeated epoch."""
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in history))


SCHEDULES = ("cosine", "step", "constant")


def check_choices(cfg: DictConfig) -> None:
    """Every named choice in the config checked before any work is done: a typo in
    ``train.precision`` must not surface after an hour of feature extraction."""
    from captioner.decoding import LENGTH_PENALTIES, METHODS
    from captioner.encoders import ENCODER_DIMS
    from captioner.features import BAD_IMAGE_MODES, CACHE_DTYPES
    from captioner.metrics import METRICS
    from captioner.model import CELLS, INJECT_MODES
    from captioner.precision import PRECISIONS

    choices = {"model.inject": INJECT_MODES, "model.cell": CELLS, "optim.schedule": SCHEDULES,
               "train.precision": PRECISIONS, "train.monitor": METRICS["bleu"], "decode.method": METHODS,
               "decode.length_penalty": LENGTH_PENALTIES, "encoder.name": ENCODER_DIMS,
               "encoder.cache_dtype": CACHE_DTYPES, "data.on_bad_image": BAD_IMAGE_MODES}
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ValueError(f"{key}={value!r}: choose one of {', '.join(allowed)}")
    for key in ("train.batch_size", "data.max_length", "decode.batch_size"):
        if OmegaConf.select(cfg, key) < 1:
            raise ValueError(f"{key}={OmegaConf.select(cfg, key)}: must be at least 1")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train (or resume, ``train.resume``) and return the last epoch's metrics plus the best one.

    Raises ``captioner.cli.Interrupted`` after saving ``last.pt`` when SIGINT/SIGTERM arrives,
    and FloatingPointError when the loss stops being finite (``last.pt`` keeps the last good step).
    Under torchrun it trains one data-parallel rank (``captioner.distributed``)."""
    check_choices(cfg)
    ctx, device = distributed.setup(resolve_device(cfg.train.device))
    try:
        with StopSignals() as stop:
            return _train(cfg, ctx, device, stop)
    finally:
        distributed.cleanup(ctx)


def _train(cfg: DictConfig, ctx: distributed.Dist, device: torch.device, stop: StopSignals) -> dict[str, Any]:
    out_dir = Path(ctx.broadcast(str(cfg.train.out_dir)))  # rank 0's: Hydra's ${now} may differ per rank
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".*.tmp"):  # temporary files of a write that a kill cut short
            stale.unlink(missing_ok=True)
    # a bad train.resume fails now, not after the data is loaded
    resume = ctx.on_main(lambda: resolve_resume(cfg.train.resume, out_dir))
    ckpt = ctx.on_main(lambda: load_checkpoint(resume)) if resume is not None else None
    # and a precision this device cannot run fails before minutes of feature extraction
    precision = Precision(cfg.train.precision, device)  # autocast (+ loss scaling for fp16)
    seed_everything(cfg.train.seed)
    log.info("device %s%s, outputs in %s", device, f" x {ctx.world_size} processes" if ctx.enabled else "", out_dir)

    with ctx.local_first():  # local rank 0 generates/reads the data set and builds the cache first
        records = drop_empty_captions(load_records(cfg.data))
        if not records.get("train"):
            raise ValueError(f"data.name={cfg.data.name}: the training split has no captioned images")
        encoder = encoder_from_config(cfg.encoder)
        # data.on_bad_image=skip drops unreadable images from the records as well as the features
        computed = all_split_features(encoder, records, feature_cache_dir(cfg.data, cfg.encoder),
                                      dtype=cfg.encoder.cache_dtype,
                                      batch_size=cfg.encoder.batch_size, num_workers=cfg.encoder.num_workers,
                                      device=device, progress=cfg.train.progress and ctx.local_rank == 0,
                                      on_bad_image=cfg.data.on_bad_image)
        if cfg.encoder.finetune_after < 0:
            del encoder  # training reads cached features only
    features = {split: f.features for split, f in computed.items()}
    records = {split: f.records for split, f in computed.items()}
    vocab = Vocabulary.build((c for r in records["train"] for c in r.captions), cfg.data.min_count)
    log.info("vocabulary: %d words (min_count=%d) from %d training images", len(vocab), cfg.data.min_count,
             len(records["train"]))

    # Seeded again here: building the feature cache draws from the global RNG (DataLoader seeds),
    # reading it does not, and the model must not depend on which of the two happened.
    seed_everything(cfg.train.seed)
    feature_dim = int(features["train"].shape[1])
    model = build_model(cfg.model, len(vocab), feature_dim).to(device)
    average = WeightAverage(model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None  # (before compiling)
    eval_model = average.model if average is not None else model  # what validation decodes and best.pt holds
    if cfg.train.compile:
        compile_loss(model, device)  # in place: state_dict names and eager decoding unchanged
    finetune_after = cfg.encoder.finetune_after  # from this step on the encoder trains too (-1: never)
    if finetune_after >= 0 and ctx.enabled:
        raise ValueError("encoder.finetune_after is not supported under torchrun yet: fine-tune in one process")
    param_groups = [{"params": list(model.parameters())}]
    if finetune_after >= 0:  # its own group from the start (no gradients until then), so checkpoints keep one shape
        encoder.to(device)
        param_groups.append({"params": list(encoder.parameters()), "lr": cfg.encoder.finetune_lr})
    optimizer = torch.optim.Adam(param_groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                 weight_decay=cfg.optim.weight_decay, **adam_options(device))
    batches = CaptionBatches(features["train"], records["train"], vocab, cfg.data.max_length,
                             cfg.train.batch_size, seed=cfg.train.seed)
    total_steps = len(batches) * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    scheduler = make_scheduler(optimizer, cfg.optim, len(batches), total_steps)

    val_split = "val" if "val" in features else "test"
    val_records, val_features = records[val_split], features[val_split]
    if cfg.train.val_max_images:
        val_records, val_features = val_records[: cfg.train.val_max_images], val_features[: cfg.train.val_max_images]

    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    monitor = cfg.train.monitor
    metrics_file, last_path, best_path = out_dir / "metrics.jsonl", out_dir / LAST, out_dir / BEST
    state = TrainState()
    saved_step: Optional[int] = None  # the step last.pt holds, once this run has written or read one

    if resume is not None:
        state = restore_training(ckpt, resume, cfg, ctx, device, model, optimizer, scheduler, vocab, feature_dim)
        if average is not None:  # a checkpoint without an average starts one from its weights
            average.model.load_state_dict(ckpt["model"])
            average.updates = int(ckpt.get("ema_updates", 0))
        precision.load_state_dict(ckpt.get("scaler") or {})  # fp16's loss scale
        if finetune_after >= 0 and "encoder" in ckpt:
            encoder.load_state_dict(ckpt["encoder"])  # fine-tuned weights (the optimizer has its second group)
        saved_step = state.step
        log.info("resumed from %s: step %d, epoch %d, batch %d of %d", resume, state.step, state.epoch + 1,
                 state.batch, len(batches))
        del ckpt
    else:
        distributed.seed_rank(cfg.train.seed, ctx)
    if ctx.is_main:  # (after the checkpoint check: a run that does not fit changes nothing in out_dir)
        vocab.save(out_dir / "vocab.json")
        write_metrics(metrics_file, state.history)  # drops rows of epochs that last.pt does not have
    step_model = distributed.wrap(model, ctx, device)  # the module the step calls (DDP under torchrun)

    def save(paths: Sequence[Path]) -> None:
        """last.pt (and best.pt) with everything needed to go on from here, written by rank 0."""
        nonlocal saved_step
        rng = ctx.gather(rng_state(device))  # every rank's streams (a collective: all ranks save together)
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise FloatingPointError(f"the weights stopped being finite at step {state.step}")
        if ctx.is_main:
            ckpt = {"format": CHECKPOINT_FORMAT, "config": plain_cfg, "vocab": vocab.to_dict(),
                    "feature_dim": feature_dim, "model": eval_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": precision.state_dict(),
                    "step": state.step, "epoch": state.epoch,
                    "batch": state.batch, "epoch_loss": {"sum": state.loss_sum, "tokens": state.tokens,
                                                         "seconds": state.seconds},
                    "best_metric": state.best, "metrics": state.history[-1] if state.history else None,
                    "history": list(state.history), "rng": rng, "world_size": ctx.world_size}
            if finetuning():  # the cached features no longer describe the encoder: it travels along
                ckpt["encoder"] = encoder.state_dict()
            if average is not None:  # "model" holds the average (what evaluate decodes); resume needs both
                ckpt["trained_model"], ckpt["ema_updates"] = model.state_dict(), average.updates
            for path in paths:
                save_checkpoint(path, ckpt)
        saved_step = state.step

    def interrupted() -> Interrupted:
        name = signal.Signals(stop.signum).name
        return Interrupted(stop.signum, f"interrupted ({name}) at step {state.step}; saved {last_path}; "
                                        f"resume with train.resume=auto train.out_dir={out_dir}")

    def finetuning() -> bool:
        return finetune_after >= 0 and state.step >= finetune_after

    def finetune_batches(epoch: int):
        """The rest of the epoch as (images, tokens), the encoder unfrozen (BatchNorm kept in eval mode)."""
        if encoder.frozen:
            encoder.unfreeze().train()
            log.info("step %d: fine-tuning the encoder from here on (encoder.finetune_lr=%g)", state.step,
                     cfg.encoder.finetune_lr)
        images = batches.epoch_images(epoch, records["train"], encoder.transform_spec(), start=state.batch,
                                      num_workers=cfg.encoder.num_workers)
        if cfg.train.max_steps:
            images = itertools.islice(images, cfg.train.max_steps - state.step)
        return images

    if finetune_after >= 0:
        normalize = Normalize(encoder.transform_spec()).to(device)

        def encode(images: torch.Tensor) -> torch.Tensor:
            return encoder(normalize(images))

    from tqdm import tqdm

    stop.armed = True
    try:
        for epoch in range(state.epoch, cfg.train.epochs):
            if cfg.train.max_steps and state.step >= cfg.train.max_steps:
                break
            if ctx.any(stop.signum is not None, device):  # arrived during the last evaluation
                raise interrupted()
            started = time.perf_counter() - state.seconds
            epoch_batches = batches.epoch(epoch, start=state.batch)
            if finetune_after >= 0:  # from cached features up to step finetune_after, from images after
                epoch_batches = itertools.islice(epoch_batches, max(0, finetune_after - state.step))
            if cfg.train.max_steps:
                epoch_batches = itertools.islice(epoch_batches, cfg.train.max_steps - state.step)
            if ctx.enabled:
                epoch_batches = distributed.shard_batches(epoch_batches, ctx)

            def on_step(loss: float, n_tokens: int) -> None:
                if average is not None:
                    average.update(model)
                state.step += 1
                state.batch += 1
                state.loss_sum += loss * n_tokens
                state.tokens += n_tokens
                state.seconds = time.perf_counter() - started
                if cfg.train.log_every and state.step % cfg.train.log_every == 0:
                    log.info("step %d | epoch %d batch %d/%d | train/loss %.4f | lr %.3g", state.step, epoch + 1,
                             state.batch, len(batches), loss, scheduler.get_last_lr()[0])
                stopping = ctx.any(stop.signum is not None, device)
                if stopping or (cfg.train.save_every and state.step % cfg.train.save_every == 0):
                    save([last_path])
                if stopping:
                    raise interrupted()

            with tqdm(total=len(batches), initial=state.batch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                      disable=not (cfg.train.progress and ctx.is_main), leave=False) as bar:
                train_one_epoch(step_model, optimizer, scheduler, epoch_batches, device, cfg.optim.grad_clip,
                                progress=bar, on_step=on_step, precision=precision)
                if finetuning() and state.batch < len(batches) and not (
                        cfg.train.max_steps and state.step >= cfg.train.max_steps):
                    train_one_epoch(step_model, optimizer, scheduler, finetune_batches(epoch), device,
                                    cfg.optim.grad_clip, progress=bar, on_step=on_step, precision=precision,
                                    encode=encode)
            train_loss = state.loss_sum / max(state.tokens, 1)
            if finetuning():  # the cache describes the original encoder: encode val with the current one
                val_features = compute_features(encoder, val_records, cfg.encoder.cache_dtype, cfg.encoder.batch_size,
                                                cfg.encoder.num_workers, device)
            scores, _ = evaluate(eval_model, val_features, val_records, vocab, cfg.decode, device,
                                 shards=ctx if ctx.enabled else None)
            row = {"epoch": epoch + 1, "step": state.step, "train/loss": round(train_loss, 5),
                   "lr": scheduler.get_last_lr()[0], "time_s": round(time.perf_counter() - started, 2),
                   **{f"val/{k}": v for k, v in scores.items() if isinstance(v, (int, float))}}
            log.info("epoch %d step %d | train/loss %.3f | val/Bleu_1 %.3f val/Bleu_4 %.3f | %.1fs",
                     epoch + 1, state.step, train_loss, scores["Bleu_1"], scores["Bleu_4"], row["time_s"])
            value = scores[monitor]
            improved = value > state.best
            state.best = max(state.best, value)
            state.history.append(row)
            state.epoch, state.batch, state.loss_sum, state.tokens, state.seconds = epoch + 1, 0, 0.0, 0, 0.0
            save([last_path, best_path] if improved else [last_path])
            if ctx.is_main:
                write_metrics(metrics_file, state.history)
    except FloatingPointError as err:
        kept = (f"{last_path} keeps step {saved_step}, the last good state" if saved_step is not None
                else "no checkpoint was written")
        raise FloatingPointError(f"step {state.step + 1}: {err}; stopped, {kept}") from None
    finally:
        stop.armed, stop.phase = False, f"after training ({last_path} holds step {state.step})"

    if not state.history:
        return {"step": state.step, "epoch": state.epoch}
    if cfg.train.plot and ctx.is_main:
        plot_history(state.history, out_dir / "curves.png", monitor)
    final = {**state.history[-1], f"best/{monitor}": state.best}
    log.info("final val %s %.4f (best %.4f); checkpoints in %s", monitor, state.history[-1][f"val/{monitor}"],
             state.best, out_dir)
    return final


CHECKPOINT_FORMAT = 2  # 2: + batch, epoch_loss, history, rng, scaler, world_size (exact resume)


def restore_training(ckpt: dict, path, cfg, ctx: distributed.Dist, device, model, optimizer, scheduler,
                     vocab: Vocabulary, feature_dim: int) -> TrainState:
    """Load a checkpoint's weights, optimizer, scheduler and RNG streams; return where it stopped."""
    check_resumable(ckpt, path, vocab.itos, feature_dim, OmegaConf.to_container(cfg.model, resolve=True))
    try:
        model.load_state_dict(ckpt.get("trained_model", ckpt["model"]))  # (with optim.ema_decay "model" is the average)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path} does not fit this model: {str(err).strip().splitlines()[-1].strip()}") from None
    saved_train = ckpt["config"].get("train", {})
    changed = [f"train.{k}={cfg.train[k]} (checkpoint: {saved_train[k]})" for k in ("batch_size", "seed")
               if k in saved_train and saved_train[k] != cfg.train[k]]
    if changed:
        log.warning("resuming with %s: the run goes on, but not as the original run would have", ", ".join(changed))
    epoch_loss = ckpt.get("epoch_loss") or {}
    state = TrainState(step=int(ckpt["step"]), epoch=int(ckpt["epoch"]), batch=int(ckpt.get("batch", 0)),
                       loss_sum=float(epoch_loss.get("sum", 0.0)), tokens=int(epoch_loss.get("tokens", 0)),
                       seconds=float(epoch_loss.get("seconds", 0.0)),
                       best=float(ckpt.get("best_metric", -math.inf)),
                       history=list(ckpt.get("history") or ([ckpt["metrics"]] if ckpt.get("metrics") else [])))
    rng = ckpt.get("rng")
    if isinstance(rng, list) and len(rng) == ctx.world_size:
        set_rng_state(rng[ctx.rank], device)
    else:
        log.warning("%s holds no random state for %d process(es): dropout is re-seeded, so the resumed run is "
                    "not bit-identical to an uninterrupted one", path, ctx.world_size)
        torch.manual_seed(cfg.train.seed * 1000003 + state.step * 101 + ctx.rank)
    return state


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    if cfg.train.out_dir is None:
        resume = cfg.train.resume
        if resume and resume != "auto":  # go on writing where the checkpoint is
            cfg.train.out_dir = str(Path(resume).parent if not Path(resume).is_dir() else Path(resume))
        else:
            cfg.train.out_dir = HydraConfig.get().runtime.output_dir
    with known_errors():
        train(cfg)


def main() -> None:
    """``python -m captioner.train`` / ``torchrun -m captioner.train``: a config error or a known
    error is one line on stderr and exit status 1; SIGINT/SIGTERM save and exit with 130/143."""
    run(hydra_main, "train")


if __name__ == "__main__":
    main()
