"""Data-parallel training on PyTorch's own distributed engine (DistributedDataParallel).

Launch one process per device with torchrun; each reads RANK / WORLD_SIZE / LOCAL_RANK from the
environment (a plain ``python -m captioner.train`` is a world of one and touches none of this):

    torchrun --nproc_per_node=4 -m captioner.train train.batch_size=256 ...

How the pieces fit, so that N processes compute what one process would:
- ``train.batch_size`` is the global batch. Every rank walks the same deterministic sequence of
  global batches (``CaptionBatches.epoch``) and takes its contiguous slice of each one
  (``shard_batches``), so nothing about the order depends on the number of processes.
- The loss is a mean over real tokens (the objective's weight) and shards hold different numbers
  of tokens, so ``DataParallelStep`` weights each rank's mean by its share of the
  global weight (one tiny all-reduce); DDP's gradient average is then exactly the gradient of
  the global batch's per-token mean, the same as a single process (to rounding). A part of the
  loss that is a mean over the batch's rows (``ObjectiveOutput.row_mean``: Show-Attend-Tell's
  attention penalty) is weighted by each rank's share of the rows instead.
- Validation decodes a slice of the images per rank and gathers the captions; every rank scores
  the whole split, so all ranks agree on the metric and on "best".
- CNN fine-tuning (``encoder.finetune_after``): from that step the shards hold images and the
  encoder, a DDP of its own, encodes them inside the step (``DataParallelStep``).
- Only rank 0 writes files (checkpoints, metrics, plots, vocabulary). Data preparation and the
  feature cache are done by local rank 0 of each node first while the others wait at a barrier,
  then read what it wrote.
NCCL is the backend on GPUs, Gloo on CPUs.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from captioner.data.batches import Batch
from captioner.objectives.base import ObjectiveOutput

log = logging.getLogger("captioner.training.distributed")

# Long enough for local rank 0 to build a feature cache while the others wait at the barrier;
# for very large data sets, extract features first (python -m captioner.extract).
TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. A world of one (the default) makes every method a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (no-ops in a world of one) ----------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (any picklable object; it travels between our processes only)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn):
        """``fn()`` run by rank 0 alone; its result, or the exception it raised, on every rank
        (so an error there stops every rank at once instead of leaving them waiting)."""
        if not self.enabled:
            return fn()
        outcome = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except Exception as err:  # noqa: BLE001 - re-raised on every rank below
                outcome = ("error", err)
        kind, value = self.broadcast(outcome)
        if kind == "error":
            raise value
        return value

    def gather(self, obj: Any) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    @contextlib.contextmanager
    def local_first(self) -> Iterator[None]:
        """Local rank 0 of each node runs the block first (e.g. writes a cache); the other ranks
        run it after, when they can read what it wrote. Works with or without a shared disk."""
        first = self.local_rank == 0
        if self.enabled and not first:
            dist.barrier()
        try:
            yield
        finally:
            if self.enabled and first:
                dist.barrier()  # even when the block failed: the others then fail with the same error

    # -- splitting work ----------------------------------------------------------------------
    def part(self, n: int) -> range:
        """This rank's contiguous slice of ``n`` items (sizes differ by at most one)."""
        return self.part_of(self.rank, n)

    def part_of(self, rank: int, n: int) -> range:
        """Rank ``rank``'s contiguous slice of ``n`` items."""
        base, extra = divmod(n, self.world_size)
        start = rank * base + min(rank, extra)
        return range(start, start + base + (1 if rank < extra else 0))

    def gather_list(self, items: list) -> list:
        """The concatenation of every rank's ``items``, in rank order."""
        return [x for part in self.gather(items) for x in part] if self.enabled else items


def from_env() -> Dist:
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist()
    return Dist(rank=int(env["RANK"]), world_size=world, local_rank=int(env.get("LOCAL_RANK", env["RANK"])))


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun set up the environment for; returns (this rank, its device).

    On GPUs each process takes ``cuda:LOCAL_RANK`` and NCCL; on CPUs Gloo."""
    ctx = from_env()
    if not ctx.enabled:
        return ctx, device
    if device.type == "cuda":
        if device.index is not None and device.index != ctx.local_rank:
            log.warning("train.device=%s ignored under torchrun: rank %d uses cuda:%d", device, ctx.rank,
                        ctx.local_rank)
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=TIMEOUT, **kwargs)
    if ctx.rank != 0:  # one log for the job, rank 0's (errors still reach stderr from every rank)
        logging.getLogger("captioner").setLevel(logging.ERROR)
    return ctx, device


def cleanup(ctx: Dist) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard_batches(batches: Iterable[Batch], ctx: Dist) -> Iterator[Batch]:
    """This rank's contiguous slice of every global batch, trimmed to its own longest caption. A
    rank whose slice is empty (a last batch smaller than the world) gets an empty batch;
    ``DataParallelStep`` still takes part in the gradient all-reduce."""
    from captioner.data.vocab import PAD_ID

    for batch in batches:
        rows = ctx.part(batch.features.size(0))
        part = Batch(*(None if t is None else t[rows.start : rows.stop] for t in batch))
        if len(rows):
            part = part._replace(tokens=part.tokens[:, : int((part.tokens != PAD_ID).sum(dim=1).max())])
        yield part


class _ObjectiveForward(nn.Module):
    """DDP hooks into ``forward``: here it is the objective applied to the model."""

    def __init__(self, model: nn.Module, objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: Batch) -> ObjectiveOutput:
        return self.objective(self.model, batch)


class _Encode(nn.Module):
    """DDP hooks into ``forward``: here the encoder turning a batch's images into features."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.encoder.normalize(images))


class DataParallelStep:
    """The objective on the model through DDP: calling it with a batch (this rank's shard) gives
    what the objective gives in one process, so ``engine.train_one_epoch`` trains either.

    The returned loss has the value of the global batch's mean (so logs, the NaN check and the
    epoch mean agree on every rank) and the gradient of this rank's weighted sum over the global
    weight (its ``row_mean`` part: over the global rows), times the world size that DDP's average
    divides by. ``weight`` is the global one.

    Once ``encode_images_with(encoder)`` is called (CNN fine-tuning), batches hold images, which
    the encoder turns into features inside the step; the encoder is a DDP of its own, built then,
    because DDP only syncs the parameters that needed gradients when it was built."""

    def __init__(self, model: nn.Module, objective, device: torch.device, world_size: int):
        self.device, self.world = device, world_size
        self.ddp = nn.parallel.DistributedDataParallel(_ObjectiveForward(model, objective), **self._placement())
        self.encode: Optional[nn.Module] = None

    def _placement(self) -> dict:
        return {"device_ids": [self.device.index] if self.device.type == "cuda" else None}

    def encode_images_with(self, encoder: nn.Module) -> None:
        if self.encode is None:  # (unused: a classifier head the features do not go through, e.g. Lite0's)
            self.encode = nn.parallel.DistributedDataParallel(_Encode(encoder), find_unused_parameters=True,
                                                              **self._placement())

    def __call__(self, batch: Batch) -> ObjectiveOutput:
        from captioner.data.vocab import BOS_ID, EOS_ID

        empty = batch.features.size(0) == 0
        if empty:  # take part in the all-reduces with a stand-in example of weight 0
            zero = torch.zeros(1, dtype=torch.long, device=batch.tokens.device)
            batch = Batch(batch.features.new_zeros((1, *batch.features.shape[1:])),
                          torch.tensor([[BOS_ID, EOS_ID]], device=batch.tokens.device), zero,
                          None if batch.seeds is None else zero)
        if self.encode is not None:  # (a stand-in image too: the encoder's all-reduce needs every rank)
            batch = batch._replace(features=self.encode(batch.features))
        out = self.ddp(batch)
        # each part of the loss by this rank's share of its own units: the mean over weight units
        # (tokens) and the mean over rows (a decoder's penalty) of the global batch
        row_mean = out.row_mean if out.row_mean is not None else out.loss.new_zeros(())
        unit_mean = out.loss - row_mean
        n_local = 0 if empty else int(out.weight)
        rows_local = 0 if empty else batch.features.size(0)
        stats = torch.tensor([float(n_local), unit_mean.detach().double().item() * n_local, float(rows_local),
                              row_mean.detach().double().item() * rows_local], dtype=torch.float64, device=self.device)
        dist.all_reduce(stats)
        n_global, rows_global = int(stats[0].item()), max(int(stats[2].item()), 1)
        global_mean = stats[1].item() / max(n_global, 1) + stats[3].item() / rows_global
        scaled = (unit_mean * (n_local * self.world / max(n_global, 1))
                  + row_mean * (rows_local * self.world / rows_global))
        return ObjectiveOutput(scaled + (global_mean - scaled.detach()), n_global, out.figures)


def wrap(model: nn.Module, objective, ctx: Dist, device: torch.device) -> Callable[[Batch], ObjectiveOutput]:
    """What the training step calls: the objective on the model, through DDP under torchrun."""
    if ctx.enabled:
        return DataParallelStep(model, objective, device, ctx.world_size)
    return functools.partial(objective, model)


def seed_rank(seed: int, ctx: Dist) -> None:
    """Independent dropout streams per rank (rank 0 keeps the single-process stream)."""
    if ctx.enabled and ctx.rank:
        torch.manual_seed(seed * 1000003 + ctx.rank)


