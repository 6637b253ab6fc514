"""python -m captioner.extract [overrides]: compute every split's feature cache ahead of training.

Its config (conf/extract.yaml) is the training config, so a following ``python -m
captioner.train`` with the same data/encoder overrides reuses the cache. An interrupted
extraction resumes where it stopped when rerun. Under torchrun
(``torchrun --nproc_per_node=N -m captioner.extract ...``) every rank encodes its share of each
split into the same cache, which must be on a disk the ranks share.
"""
from __future__ import annotations

import logging

from omegaconf import DictConfig

from captioner.training import distributed
from captioner.cli import command
from captioner.config import validate
from captioner.data import load_records
from captioner.encoding.encoders import run_encoder
from captioner.encoding.features import SplitFeatures, all_split_features, extraction_options, feature_cache_dir
from captioner.runtime import resolve_device, seed_everything

log = logging.getLogger("captioner.extract")


def extract(cfg: DictConfig) -> dict[str, SplitFeatures]:
    validate(cfg)
    ctx, device = distributed.setup(resolve_device(cfg.train.device))
    try:
        seed_everything(cfg.train.seed)  # as train does: random (pretrained=false) weights then match its cache
        encoder = run_encoder(cfg)  # (first: weights that cannot be had fail before the data work)
        with ctx.local_first():  # local rank 0 generates or indexes the data set first
            records = load_records(cfg.data)
        results = all_split_features(
            encoder, records, feature_cache_dir(cfg.data, cfg.encoder), device=device,
            **extraction_options(cfg.encoder), progress=cfg.train.progress, on_bad_image=cfg.data.on_bad_image,
            ctx=ctx)
    finally:
        distributed.cleanup(ctx)
    if ctx.is_main:
        report(cfg, results)
    return results


def report(cfg: DictConfig, results: dict[str, SplitFeatures]) -> None:
    for split, r in results.items():
        done = f"computed {r.computed} in {r.seconds:.1f}s, {r.images_per_s:.1f} images/s" if r.computed else "cached"
        skipped = f", {len(r.skipped)} unreadable skipped" if r.skipped else ""
        print(f"{split}: {len(r.records)} images x {' x '.join(map(str, r.features.shape[1:]))} {r.features.dtype} "
              f"({done}{skipped}) -> {r.features.filename}")
    computed, seconds = sum(r.computed for r in results.values()), sum(r.seconds for r in results.values())
    if computed:
        print(f"{cfg.encoder.name}: {computed} images in {seconds:.1f}s = {computed / seconds:.1f} images/s")


main = command("extract", extract)

if __name__ == "__main__":
    main()
