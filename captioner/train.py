"""python -m captioner.train [overrides]: train a captioner; Hydra composes the config from conf/.

``main`` is a thin Hydra entry; ``train(cfg)`` does the work and returns the final metrics, so
tests compose the real config with small overrides and call it directly.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from captioner.config import CONF_DIR
from captioner.checkpoint import save_checkpoint
from captioner.datasets import load_records
from captioner.encoders import build_encoder
from captioner.engine import CaptionBatches, evaluate, train_one_epoch
from captioner.features import cached_features
from captioner.io import atomic_write
from captioner.model import build_model
from captioner.vocab import Vocabulary

log = logging.getLogger("captioner.train")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def feature_cache_dir(cfg) -> Path:
    return Path(cfg.encoder.cache_dir or Path(cfg.data.root) / "features")


def load_split_features(cfg, encoder, records, device) -> dict[str, np.ndarray]:
    return {
        split: cached_features(encoder, recs, feature_cache_dir(cfg), split, dtype=cfg.encoder.cache_dtype,
                               batch_size=cfg.encoder.batch_size, num_workers=cfg.encoder.num_workers,
                               device=device, progress=cfg.train.progress)
        for split, recs in records.items() if recs
    }


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


def train(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    log.info("device %s, outputs in %s", device, out_dir)

    records = load_records(cfg.data)
    vocab = Vocabulary.build((c for r in records["train"] for c in r.captions), cfg.data.min_count)
    vocab.save(out_dir / "vocab.json")
    log.info("vocabulary: %d words (min_count=%d) from %d training images", len(vocab), cfg.data.min_count,
             len(records["train"]))

    encoder = build_encoder(cfg.encoder.name, pretrained=cfg.encoder.pretrained, weights=cfg.encoder.weights)
    features = load_split_features(cfg, encoder, records, device)
    del encoder  # training reads cached features only

    model = build_model(cfg.model, len(vocab), features["train"].shape[1]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                 weight_decay=cfg.optim.weight_decay)
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
    history: list[dict] = []
    best = -math.inf
    step = 0
    metrics_file = out_dir / "metrics.jsonl"
    monitor = cfg.train.monitor
    from tqdm import tqdm

    for epoch in range(cfg.train.epochs):
        start = time.perf_counter()
        epoch_batches = batches.epoch(epoch)
        if cfg.train.max_steps:
            epoch_batches = (b for _, b in zip(range(cfg.train.max_steps - step), epoch_batches))
        with tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not cfg.train.progress,
                  leave=False) as bar:
            train_loss, steps = train_one_epoch(model, optimizer, scheduler, epoch_batches, device,
                                                cfg.optim.grad_clip, progress=bar)
            step += steps
        scores, _ = evaluate(model, val_features, val_records, vocab, cfg.decode, device)
        row = {"epoch": epoch + 1, "step": step, "train/loss": round(train_loss, 5),
               "lr": scheduler.get_last_lr()[0], "time_s": round(time.perf_counter() - start, 2),
               **{f"val/{k}": v for k, v in scores.items() if isinstance(v, (int, float))}}
        history.append(row)
        with open(metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        log.info("epoch %d step %d | train/loss %.3f | val/Bleu_1 %.3f val/Bleu_4 %.3f | %.1fs",
                 epoch + 1, step, train_loss, scores["Bleu_1"], scores["Bleu_4"], row["time_s"])

        value = scores[monitor]
        improved = value > best
        best = max(best, value)
        state = {"config": plain_cfg, "vocab": vocab.to_dict(), "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "step": step, "epoch": epoch + 1, "best_metric": best, "metrics": row,
                 "feature_dim": int(features["train"].shape[1])}
        save_checkpoint(out_dir / "last.pt", state)
        if improved:
            save_checkpoint(out_dir / "best.pt", state)
        if cfg.train.max_steps and step >= cfg.train.max_steps:
            break

    if cfg.train.plot and history:
        plot_history(history, out_dir / "curves.png", monitor)
    final = {**history[-1], f"best/{monitor}": best}
    log.info("final val %s %.4f (best %.4f); checkpoints in %s", monitor, history[-1][f"val/{monitor}"], best, out_dir)
    return final


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    if cfg.train.out_dir is None:
        cfg.train.out_dir = HydraConfig.get().runtime.output_dir
    train(cfg)


if __name__ == "__main__":
    main()
