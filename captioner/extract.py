"""python -m captioner.extract [overrides]: compute every split's feature cache ahead of training.

It composes the train config (same data/encoder groups, same cache directory), so a following
``python -m captioner.train`` with the same data/encoder overrides reuses the cache. An
interrupted extraction resumes where it stopped when rerun.
"""
from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from captioner.config import CONF_DIR
from captioner.datasets import load_records
from captioner.encoders import encoder_from_config
from captioner.features import SplitFeatures, all_split_features

log = logging.getLogger("captioner.extract")


def extract(cfg: DictConfig) -> dict[str, SplitFeatures]:
    from captioner.train import feature_cache_dir, resolve_device, seed_everything

    seed_everything(cfg.train.seed)  # as train does: random (pretrained=false) weights then match its cache
    records = load_records(cfg.data)
    encoder = encoder_from_config(cfg.encoder)
    results = all_split_features(
        encoder, records, feature_cache_dir(cfg.data, cfg.encoder), dtype=cfg.encoder.cache_dtype,
        batch_size=cfg.encoder.batch_size,
        num_workers=cfg.encoder.num_workers, device=resolve_device(cfg.train.device), progress=cfg.train.progress,
        on_bad_image=cfg.data.on_bad_image)
    for split, r in results.items():
        done = f"computed {r.computed} in {r.seconds:.1f}s, {r.images_per_s:.1f} images/s" if r.computed else "cached"
        skipped = f", {len(r.skipped)} unreadable skipped" if r.skipped else ""
        print(f"{split}: {len(r.records)} images x {r.features.shape[1]} {r.features.dtype} "
              f"({done}{skipped}) -> {r.features.filename}")
    computed, seconds = sum(r.computed for r in results.values()), sum(r.seconds for r in results.values())
    if computed:
        print(f"{cfg.encoder.name}: {computed} images in {seconds:.1f}s = {computed / seconds:.1f} images/s")
    return results


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    from captioner.cli import known_errors

    with known_errors():
        extract(cfg)


def main() -> None:
    from captioner import cli

    if not any(a.startswith("hydra.run.dir=") for a in sys.argv[1:]):  # train.yaml's default is outputs/train/
        sys.argv.append("hydra.run.dir=outputs/extract/${now:%Y-%m-%d_%H-%M-%S}")
    cli.run(hydra_main, "train")


if __name__ == "__main__":
    main()
