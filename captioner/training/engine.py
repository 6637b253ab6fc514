"""The training epoch: batches through the objective, backward, the optimizer step. Free of Hydra,
so tests and benchmarks call it directly."""
from __future__ import annotations

import functools
import math
from typing import Optional

from captioner.data.batches import Batch
from captioner.objectives.base import ObjectiveOutput
from captioner.objectives.cross_entropy import CrossEntropy
from captioner.training.precision import Precision


def train_one_epoch(model, optimizer, scheduler, batches, device, grad_clip: float = 0.0,
                    progress=None, on_step=None, precision: Optional[Precision] = None,
                    encode=None, compute=None) -> tuple[float, int]:
    """One pass over ``batches`` (``objectives.Batch``); returns the mean loss per unit of weight
    (per real token, for cross-entropy) and the number of steps.

    ``compute(batch) -> ObjectiveOutput`` is the training objective applied to the model (under
    torchrun, through DDP: ``captioner.training.distributed.wrap``); the default is cross-entropy.
    ``encode`` (fine-tuning the CNN) turns a batch's images into features inside the step, so the
    loss reaches the encoder. Gradient clipping covers every parameter the optimizer holds.

    ``precision`` (``captioner.training.precision.Precision``; default fp32) adds autocast around the
    loss and, for fp16, loss scaling around backward and the optimizer step.

    ``on_step(output, loss)`` runs after every optimizer step (checkpointing, stopping) with the
    objective's output and the loss as a float. A loss that is not finite raises
    FloatingPointError before it can reach the weights."""
    if compute is None:
        compute = functools.partial(CrossEntropy(), model)
    model.train()
    precision = precision or Precision("fp32")
    total_loss, total_weight, steps = 0.0, 0, 0
    for batch in batches:
        batch = Batch(*(t.to(device, non_blocking=True) if t is not None else None for t in batch))
        with precision.autocast():
            if encode is not None:
                batch = batch._replace(features=encode(batch.features))
            out: ObjectiveOutput = compute(batch)
        value = out.loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value}; lower optim.lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        precision.backward(out.loss)
        precision.step(optimizer, [p for group in optimizer.param_groups for p in group["params"]], grad_clip)
        if scheduler is not None:
            scheduler.step()
        total_loss += value * out.weight
        total_weight += out.weight
        steps += 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{total_loss / max(total_weight, 1):.3f}",
                                 **{name: f"{value:.3f}" for name, value in out.figures.items()})
        if on_step is not None:
            on_step(out, value)
    return total_loss / max(total_weight, 1), steps
