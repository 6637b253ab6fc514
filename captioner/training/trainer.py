"""Training a captioner: ``train(cfg)`` prepares a run from its config (data and feature cache,
vocabulary, model, optimizer, objective, the checkpoint to resume from), then ``fit`` loops over
the epochs. No Hydra inside: tests compose the real config and call ``train`` directly.

Raises ``captioner.runtime.Interrupted`` after saving ``last.pt`` when SIGINT/SIGTERM arrives,
and FloatingPointError when the loss stops being finite (``last.pt`` keeps the last good step).
``last.pt`` is written at the end of every epoch before validation, so an error while decoding
the validation split loses no training.
Under torchrun each process trains one data-parallel rank (``captioner.training.distributed``).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from captioner.training import distributed
from captioner.training.board import Board
from captioner.training.checkpoint import BEST, LAST, load_checkpoint, save_checkpoint
from captioner.training.rundir import claim
from captioner.training.resume import (TrainState, load_weights, resolve_resume, restore_training,
                                       training_checkpoint)
from captioner.training.rng import rng_state
from captioner.config import validate
from captioner.data import drop_empty_captions, load_records
from captioner.training.ema import WeightAverage
from captioner.encoding.encoders import run_encoder
from captioner.data.batches import CaptionBatches
from captioner.evaluation.loop import evaluate
from captioner.training.engine import train_one_epoch
from captioner.encoding.features import all_split_features, extraction_options, feature_cache_dir
from captioner.encoding.finetune import EncoderFineTuning
from captioner.training.history import plot_history, write_metrics
from captioner.models import build_model
from captioner.objectives import ObjectiveContext, build_objective
from captioner.training.optim import build_optimizer, build_scheduler
from captioner.training.precision import Precision, compile_loss
from captioner.training.runlock import RunLock
from captioner.runtime import Interrupted, StopSignals, resolve_device, seed_everything
from captioner.data.vocab import Vocabulary

log = logging.getLogger("captioner.train")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train (or resume, ``train.resume``) and return the last epoch's metrics plus the best one."""
    validate(cfg)
    ctx, device = distributed.setup(resolve_device(cfg.train.device))
    try:
        out_dir = Path(ctx.broadcast(str(cfg.train.out_dir)))  # rank 0's: Hydra's ${now} may differ per rank
        lock = RunLock(out_dir) if ctx.is_main else contextlib.nullcontext()
        with StopSignals() as stop, lock:
            return fit(prepare(cfg, ctx, device, out_dir), stop)
    finally:
        distributed.cleanup(ctx)


@dataclass
class Run:
    """Everything a training run works with, built by ``prepare``."""

    cfg: DictConfig
    ctx: distributed.Dist
    device: torch.device
    out_dir: Path
    vocab: Vocabulary
    train_records: list
    feature_dim: int
    batches: CaptionBatches
    model: torch.nn.Module
    average: Optional[WeightAverage]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Precision
    compute: Any  # the objective applied to the model (through DDP under torchrun)
    finetune: Optional[EncoderFineTuning]
    val_records: list
    val_features: np.ndarray
    state: TrainState
    board: Board
    saved_step: Optional[int] = None  # the step last.pt holds, once this run has written or read one

    @property
    def eval_model(self) -> torch.nn.Module:
        """What validation decodes and best.pt holds: the moving average when there is one."""
        return self.average.model if self.average is not None else self.model

    def finetuning(self) -> bool:
        return self.finetune is not None and self.finetune.active(self.state.step)

    def steps_left(self) -> int:
        """Steps before train.max_steps (0: no limit); -1 once it is reached."""
        limit = self.cfg.train.max_steps
        return 0 if not limit else (limit - self.state.step if self.state.step < limit else -1)

    def epoch_phases(self, epoch: int) -> Iterator[tuple[Iterator, Any]]:
        """The rest of ``epoch`` as (batches, encode) phases: cached features, then, once the
        encoder is being fine-tuned, images that ``encode`` turns into features in the step."""
        batches = self.batches.epoch(epoch, start=self.state.batch)
        if self.finetune is not None:
            batches = itertools.islice(batches, self.finetune.feature_steps(self.state.step))
        if self.steps_left() > 0:
            batches = itertools.islice(batches, self.steps_left())
        yield (distributed.shard_batches(batches, self.ctx) if self.ctx.enabled else batches), None
        if self.finetuning() and self.state.batch < len(self.batches) and self.steps_left() >= 0:
            images = self.finetune.image_batches(self.batches, epoch, self.train_records, self.state.batch,
                                                 max(self.steps_left(), 0))
            if not self.ctx.enabled:
                yield images, self.finetune.encode
                return
            self.compute.encode_images_with(self.finetune.encoder)  # the encoder then runs inside the DDP step
            yield distributed.shard_batches(images, self.ctx), None

    def save(self, names: Sequence[str]) -> None:
        """``names`` (last.pt, best.pt) with everything needed to go on from here, written by rank 0."""
        rng = self.ctx.gather(rng_state(self.device))  # every rank's streams (a collective: all ranks save)
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise FloatingPointError(f"the weights stopped being finite at step {self.state.step}")
        if self.ctx.is_main:
            ckpt = training_checkpoint(
                config=OmegaConf.to_container(self.cfg, resolve=True), vocab=self.vocab, feature_dim=self.feature_dim,
                state=self.state, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                precision=self.precision, rng=rng, world_size=self.ctx.world_size, average=self.average,
                encoder=self.finetune.encoder if self.finetuning() else None)
            for name in names:
                save_checkpoint(self.out_dir / name, ckpt)
        self.saved_step = self.state.step

    def interrupted(self, signal_name: str, signum: int) -> Interrupted:
        return Interrupted(signum, f"interrupted ({signal_name}) at step {self.state.step}; saved "
                                   f"{self.out_dir / LAST}; resume with train.resume=auto train.out_dir={self.out_dir}")


def prepare(cfg: DictConfig, ctx: distributed.Dist, device: torch.device, out_dir: Path) -> Run:
    """Data, vocabulary, model, optimizer and objective for ``cfg``, restored from the checkpoint
    that ``train.resume`` names. Checks that fail fast (a bad resume path, a precision this device
    cannot run) come before the data is read or features are extracted."""
    # (under the train command, Hydra's log and config of this run are already there: kept)
    ctx.on_main(lambda: claim(out_dir, cfg.train.resume, cfg.train.overwrite, keep=(".hydra", "train.log")))
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".*.tmp"):  # temporary files of a write that a kill cut short
            stale.unlink(missing_ok=True)
    resume = ctx.on_main(lambda: resolve_resume(cfg.train.resume, out_dir))
    ckpt = ctx.on_main(lambda: load_checkpoint(resume)) if resume is not None else None
    precision = Precision(cfg.train.precision, device)  # autocast (+ loss scaling for fp16)
    Board.writer_class(cfg.train.tensorboard)  # train.tensorboard=true without the package fails here
    seed_everything(cfg.train.seed)
    log.info("device %s%s, outputs in %s", device, f" x {ctx.world_size} processes" if ctx.enabled else "", out_dir)

    with ctx.local_first():  # local rank 0 generates/reads the data set and builds the cache first
        encoder = run_encoder(cfg)  # (first: weights that cannot be had fail before the data work)
        records = drop_empty_captions(load_records(cfg.data))
        if not records.get("train"):
            raise ValueError(f"data.name={cfg.data.name}: the training split has no captioned images")
        # data.on_bad_image=skip drops unreadable images from the records as well as the features
        computed = all_split_features(encoder, records, feature_cache_dir(cfg.data, cfg.encoder),
                                      device=device, **extraction_options(cfg.encoder),
                                      progress=cfg.train.progress and ctx.local_rank == 0,
                                      on_bad_image=cfg.data.on_bad_image)
    features = {split: f.features for split, f in computed.items()}
    records = {split: f.records for split, f in computed.items()}
    start = ctx.on_main(lambda: load_checkpoint(cfg.train.init_from)) if cfg.train.init_from else None
    if start is not None:  # its vocabulary: the weights were trained to read and write those ids
        vocab = Vocabulary.from_dict(start["vocab"])
        log.info("starting from %s (step %s): its weights and its %d-word vocabulary", cfg.train.init_from,
                 start.get("step"), len(vocab))
    else:
        vocab = Vocabulary.build((c for r in records["train"] for c in r.captions), cfg.data.min_count)
        log.info("vocabulary: %d words (min_count=%d) from %d training images", len(vocab), cfg.data.min_count,
                 len(records["train"]))

    # Seeded again here: building the feature cache draws from the global RNG (DataLoader seeds),
    # reading it does not, and the model must not depend on which of the two happened.
    seed_everything(cfg.train.seed)
    feature_dim = int(features["train"].shape[-1])
    model = build_model(cfg.model, len(vocab), feature_dim).to(device)
    if start is not None:
        load_weights(start, cfg.train.init_from, model, feature_dim, OmegaConf.to_container(cfg.model, resolve=True))
    average = WeightAverage(model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None  # (before compiling)
    if cfg.train.compile:
        compile_loss(model, device)  # in place: state_dict names and eager decoding unchanged
    finetune = EncoderFineTuning(encoder, cfg.encoder, device) if cfg.encoder.finetune_after >= 0 else None
    param_groups = [{"params": list(model.parameters())}] + ([finetune.param_group()] if finetune else [])
    optimizer = build_optimizer(param_groups, cfg.optim, device)
    context = ObjectiveContext(vocab, records["train"], cfg.decode, device)
    objective = build_objective(cfg.objective, context)
    batches = objective.batches(features["train"], context, cfg)
    if finetune is not None and not isinstance(batches, CaptionBatches):
        raise ValueError(f"encoder.finetune_after works with objective=cross_entropy, not {cfg.objective.name}")
    total_steps = len(batches) * cfg.train.epochs
    scheduler = build_scheduler(optimizer, cfg.optim, len(batches),
                                min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps)

    val_split = "val" if "val" in features else "test"
    limit = cfg.train.val_max_images or None
    state = TrainState()
    if ckpt is not None:
        state = restore_training(ckpt, resume, cfg, rank=ctx.rank, world_size=ctx.world_size, device=device,
                                 model=model, optimizer=optimizer, scheduler=scheduler, precision=precision,
                                 vocab=vocab, feature_dim=feature_dim, average=average,
                                 encoder=finetune.encoder if finetune else None)
        log.info("resumed from %s: step %d, epoch %d, batch %d of %d", resume, state.step, state.epoch + 1,
                 state.batch, len(batches))
    else:
        distributed.seed_rank(cfg.train.seed, ctx)
    board = Board()
    if ctx.is_main:  # (after the checkpoint check: a run that does not fit changes nothing in out_dir)
        # a resumed run drops the events logged after its checkpoint
        board = Board.open(cfg.train.tensorboard, out_dir, state.step + 1 if ckpt is not None else None)
        vocab.save(out_dir / "vocab.json")
        write_metrics(out_dir / "metrics.jsonl", state.history)  # drops rows of epochs last.pt does not have
    return Run(cfg, ctx, device, out_dir, vocab, records["train"], feature_dim, batches, model, average, optimizer,
               scheduler, precision, distributed.wrap(model, objective, ctx, device), finetune,
               records[val_split][:limit], features[val_split][:limit], state, board,
               saved_step=state.step if ckpt is not None else None)


def fit(run: Run, stop: StopSignals) -> dict[str, Any]:
    """The epochs from where ``run.state`` stands: train, validate by decoding, save, log."""
    from tqdm import tqdm

    cfg, state, ctx = run.cfg, run.state, run.ctx
    monitor = cfg.train.monitor
    started = time.perf_counter()
    board = run.board

    def on_step(out, loss: float) -> None:
        if run.average is not None:
            run.average.update(run.model)
        state.step, state.batch = state.step + 1, state.batch + 1
        state.loss_sum, state.weight = state.loss_sum + loss * out.weight, state.weight + out.weight
        for name, value in out.figures.items():
            state.figure_sums[name] = state.figure_sums.get(name, 0.0) + value * out.weight
        state.seconds = time.perf_counter() - started
        board.step(state.step, loss, run.scheduler.get_last_lr()[0], out.figures)
        if cfg.train.log_every and state.step % cfg.train.log_every == 0:
            figures = "".join(f" | train/{k} {v:.4f}" for k, v in out.figures.items())
            log.info("step %d | epoch %d batch %d/%d | train/loss %.4f%s | lr %.3g", state.step, state.epoch + 1,
                     state.batch, len(run.batches), loss, figures, run.scheduler.get_last_lr()[0])
        stopping = ctx.any(stop.signum is not None, run.device)
        if stopping or (cfg.train.save_every and state.step % cfg.train.save_every == 0):
            run.save([LAST])
        if stopping:
            raise run.interrupted(stop.name, stop.signum)

    stop.armed = True
    try:
        for epoch in range(state.epoch, cfg.train.epochs):
            if run.steps_left() < 0:
                break
            if ctx.any(stop.signum is not None, run.device):  # arrived during the last evaluation
                raise run.interrupted(stop.name, stop.signum)
            started = time.perf_counter() - state.seconds
            with tqdm(total=len(run.batches), initial=state.batch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                      disable=not (cfg.train.progress and ctx.is_main), leave=False) as bar:
                for batches, encode in run.epoch_phases(epoch):
                    train_one_epoch(run.model, run.optimizer, run.scheduler, batches, run.device, cfg.optim.grad_clip,
                                    progress=bar, on_step=on_step, precision=run.precision, encode=encode,
                                    compute=run.compute)
            train_loss = state.loss_sum / max(state.weight, 1)
            if run.saved_step != state.step:  # the epoch's training is kept whatever validation does
                run.save([LAST])
            val_features = run.finetune.features(run.val_records) if run.finetuning() else run.val_features
            scores, results = evaluate(run.eval_model, val_features, run.val_records, run.vocab, cfg.decode,
                                       run.device, metrics=("bleu", "cider"), shards=ctx if ctx.enabled else None)
            row = {"epoch": epoch + 1, "step": state.step, "train/loss": round(train_loss, 5),
                   **{f"train/{k}": round(v / max(state.weight, 1), 5) for k, v in state.figure_sums.items()},
                   "lr": run.scheduler.get_last_lr()[0], "time_s": round(time.perf_counter() - started, 2),
                   **{f"val/{k}": v for k, v in scores.items() if isinstance(v, (int, float))}}
            log.info("epoch %d step %d | train/loss %.3f | val/Bleu_1 %.3f val/Bleu_4 %.3f val/CIDEr %.3f | %.1fs",
                     epoch + 1, state.step, train_loss, scores["Bleu_1"], scores["Bleu_4"], scores["CIDEr"],
                     row["time_s"])
            board.epoch(state.step, row, results, run.val_records)
            improved = state.end_epoch(row, scores[monitor])
            run.save([LAST, BEST] if improved else [LAST])
            if ctx.is_main:
                write_metrics(run.out_dir / "metrics.jsonl", state.history)
    except FloatingPointError as err:
        kept = (f"{run.out_dir / LAST} keeps step {run.saved_step}, the last good state" if run.saved_step is not None
                else "no checkpoint was written")
        raise FloatingPointError(f"step {state.step + 1}: {err}; stopped, {kept}") from None
    finally:
        stop.armed, stop.phase = False, f"after training ({run.out_dir / LAST} holds step {state.step})"
        board.close()

    if not state.history:
        return {"step": state.step, "epoch": state.epoch}
    if cfg.train.plot and ctx.is_main:
        plot_history(state.history, run.out_dir / "curves.png", monitor)
    log.info("final val %s %.4f (best %.4f); checkpoints in %s", monitor, state.history[-1][f"val/{monitor}"],
             state.best, run.out_dir)
    return {**state.history[-1], f"best/{monitor}": state.best}
