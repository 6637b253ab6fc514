"""Training and evaluation loops, free of Hydra so tests and scripts call them directly.

``evaluate`` is the one evaluation path: validation during training, ``captioner.evaluate`` and
captioning decode and score through it. It always decodes (never teacher forcing).
"""
from __future__ import annotations

import functools
import math
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from captioner.datasets import ImageRecord
from captioner.decoding import as_tokens
from captioner.objectives import Batch, ObjectiveOutput
from captioner.precision import Precision
from captioner.vocab import BOS_ID, EOS, PAD_ID, Vocabulary


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of ``n`` training examples in ``epoch``: a function of (seed, epoch)
    alone, so a resumed run can skip to the exact batch it stopped at."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


class CaptionBatches:
    """Every (image, caption) pair as a training example, shuffled per epoch by a seeded generator.

    The order of an epoch is a function of (seed, epoch) alone, so a resumed run can skip to the
    exact batch it stopped at. Each batch is trimmed to its longest caption.
    """

    def __init__(self, features: np.ndarray, records: Sequence[ImageRecord], vocab: Vocabulary,
                 max_length: int, batch_size: int, seed: int = 0):
        count = sum(len(record.captions) for record in records)
        if not count:
            raise ValueError("the training split has no captions")
        # Filled in place (no list of lists): COCO has 616k captions, and memory should be the tensor.
        tokens = np.full((count, max_length + 2), PAD_ID, dtype=np.int64)  # + <bos>, <eos>
        rows = np.empty(count, dtype=np.int64)
        i = 0
        for row, record in enumerate(records):
            for caption in record.captions:
                ids = vocab.encode(caption, max_length)
                tokens[i, : len(ids)] = ids
                rows[i] = row
                i += 1
        self.lengths = torch.from_numpy((tokens != PAD_ID).sum(axis=1))
        self.tokens = torch.from_numpy(tokens[:, : int(self.lengths.max())].copy())
        self.rows = torch.from_numpy(rows)
        self.features = features
        self.batch_size, self.seed = batch_size, seed

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        for rows, tokens in self.epoch_rows(epoch, start):
            yield Batch(torch.from_numpy(np.asarray(self.features[rows.numpy()], dtype=np.float32)), tokens, rows)

    def epoch_rows(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch`` from ``start`` as (image rows of the records, tokens)."""
        order = epoch_order(len(self.rows), self.seed, epoch)
        for b in range(start, len(self)):
            pairs = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.rows[pairs], self.tokens[pairs, : int(self.lengths[pairs].max())]

    def epoch_images(self, epoch: int, records: Sequence[ImageRecord], encoder, start: int = 0,
                     num_workers: int = 0) -> Iterator[Batch]:
        """The same batches as ``epoch`` with each pair's image instead of its feature: uint8
        images [B, 3, H, W] as the encoder crops them (``encoder.crop``), read in ``num_workers``
        DataLoader workers; ``encoder.normalize`` finishes them."""
        from torch.utils.data import DataLoader

        from captioner.features import ImageFiles, collate
        from captioner.images import BadImageError

        batches = list(self.epoch_rows(epoch, start))
        # A private generator: worker seeds must not draw from (and shift) the global RNG.
        loader = DataLoader(ImageFiles([r.path for r in records], encoder.crop),
                            batch_sampler=[rows.tolist() for rows, _ in batches], num_workers=num_workers,
                            collate_fn=collate, generator=torch.Generator().manual_seed(0))
        for (_, images, bad), (rows, tokens) in zip(loader, batches):
            if bad:
                raise BadImageError(bad[0][1])
            yield Batch(images, tokens, rows)


class ImageBatches:
    """Every training image once per epoch, shuffled by a seeded generator (the order a function of
    (seed, epoch) alone, for exact resume), for objectives that read an image's references rather
    than one caption: each batch carries the rows' record indices and their random seeds."""

    def __init__(self, features: np.ndarray, batch_size: int, seed: int = 0):
        self.features, self.batch_size, self.seed = features, batch_size, seed

    def __len__(self) -> int:
        return math.ceil(len(self.features) / self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        order = epoch_order(len(self.features), self.seed, epoch)
        for b in range(start, len(self)):
            rows = order[b * self.batch_size : (b + 1) * self.batch_size]
            features = torch.from_numpy(np.asarray(self.features[rows.numpy()], dtype=np.float32))
            bos = torch.full((len(rows), 1), BOS_ID, dtype=torch.long)
            yield Batch(features, bos, rows, (self.seed * 1_000_003 + epoch) * 1_000_003 + rows)


def train_one_epoch(model, optimizer, scheduler, batches, device, grad_clip: float = 0.0,
                    progress=None, on_step=None, precision: Optional[Precision] = None,
                    encode=None, compute=None) -> tuple[float, int]:
    """One pass over ``batches`` (``objectives.Batch``); returns the mean loss per unit of weight
    (per real token, for cross-entropy) and the number of steps.

    ``compute(batch) -> ObjectiveOutput`` is the training objective applied to the model (under
    torchrun, through DDP: ``captioner.distributed.wrap``); the default is cross-entropy.
    ``encode`` (fine-tuning the CNN) turns a batch's images into features inside the step, so the
    loss reaches the encoder. Gradient clipping covers every parameter the optimizer holds.

    ``precision`` (``captioner.precision.Precision``; default fp32) adds autocast around the
    loss and, for fp16, loss scaling around backward and the optimizer step.

    ``on_step(output, loss)`` runs after every optimizer step (checkpointing, stopping) with the
    objective's output and the loss as a float. A loss that is not finite raises
    FloatingPointError before it can reach the weights."""
    if compute is None:
        from captioner.objectives.cross_entropy import CrossEntropy

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


@torch.no_grad()
def decode_features(model, features: np.ndarray, vocab: Vocabulary, decode_cfg, device,
                    progress: bool = False, attention: bool = False) -> list[dict]:
    """Captions for every row of ``features``: [{"row", "caption", "score", "n_best"?}]; with
    ``attention`` (an attention decoder) also "words" (the caption's, then <eos>) and "attention",
    the weights [len(words), regions] the model gave the regions before each."""
    from tqdm import tqdm

    model.eval()
    options = {k: v for k, v in dict(decode_cfg).items() if k not in ("method", "batch_size")}
    outputs = []
    batch_size = decode_cfg.batch_size
    for start in tqdm(range(0, len(features), batch_size), desc="decoding", disable=not progress, leave=False):
        batch = torch.from_numpy(np.asarray(features[start : start + batch_size], dtype=np.float32)).to(device)
        out = model.generate(batch, method=decode_cfg.method, **options)
        maps = model.attention_maps(batch, as_tokens(out.sequences, device)).cpu().numpy() if attention else None
        for i, (seq, score) in enumerate(zip(out.sequences, out.scores)):
            item = {"row": start + i, "caption": vocab.decode(seq), "score": float(score)}
            if out.n_best is not None:
                item["n_best"] = [{"caption": vocab.decode(s), "score": float(sc)} for s, sc in out.n_best[i]]
            if maps is not None:
                item["words"] = [vocab.itos[w] for w in seq] + [EOS]
                item["attention"] = maps[i, : len(seq) + 1]
            outputs.append(item)
    return outputs


def evaluate(model, features: np.ndarray, records: Sequence[ImageRecord], vocab: Vocabulary, decode_cfg,
             device, metrics: Sequence[str] = ("bleu",), tokenizer: str = "python",
             progress: bool = False, shards=None, attention: bool = False) -> tuple[dict[str, Optional[float]], list[dict]]:
    """Decode every image of a split and score against its references.

    Returns (scores, results) where results is in the COCO results format
    ``[{"image_id", "caption"}]`` (plus the score and n-best list when decoded, and with
    ``attention`` the words and their maps, as ``decode_features`` gives them).
    ``shards`` (a ``captioner.distributed.Dist``) splits the decoding across data-parallel
    processes: each decodes its ``part`` of the images and every one scores all of them.
    """
    from captioner.metrics import score_captions

    rows = range(len(features)) if shards is None else shards.part(len(features))
    decoded = decode_features(model, features[rows.start : rows.stop], vocab, decode_cfg, device, progress, attention)
    for item in decoded:
        item["row"] += rows.start
    if shards is not None:
        decoded = shards.gather_list(decoded)
    results = []
    for item in decoded:
        record = records[item.pop("row")]
        results.append({"image_id": record.image_id, **item})
    references = {r.image_id: list(r.captions) for r in records}
    candidates = {r["image_id"]: r["caption"] for r in results}
    scores = score_captions(references, candidates, metrics=metrics, tokenizer=tokenizer)
    return scores, results
