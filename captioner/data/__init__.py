"""Data sets as lists of captioned images, one list per split.

Every source (the embedded shapes set, Flickr8k, COCO, any COCO-format set) returns the same
plain structure, so the rest of the pipeline never branches on where the data came from.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger("captioner.data")


@dataclass
class ImageRecord:
    """One image and its reference captions. ``path`` is absolute."""

    image_id: int
    path: str
    captions: list[str] = field(default_factory=list)


def load_records(data_cfg, generate: bool = True) -> dict[str, list[ImageRecord]]:
    """The captioned images of every split for a ``data`` config node. ``generate=False``: a
    generated data set (shapes) must be there already; nothing is written."""
    from pathlib import Path

    root = Path(data_cfg.root)

    def under_root(p):
        return None if p is None else str(root / p)

    if data_cfg.name == "shapes":
        from captioner.data.shapes import load_shapes

        return load_shapes(str(root), data_cfg.num_train, data_cfg.num_val, data_cfg.num_test,
                           data_cfg.image_size, data_cfg.seed, generate=generate)
    if data_cfg.name == "flickr8k":
        from captioner.data.flickr8k import load_flickr8k

        kwargs = {k: v for k, v in (("token_file", data_cfg.token_file), ("image_dir", data_cfg.image_dir)) if v}
        return load_flickr8k(str(root), karpathy_json=under_root(data_cfg.karpathy_json), **kwargs)
    if data_cfg.name == "coco_karpathy":
        from captioner.data.coco import load_coco_karpathy

        return load_coco_karpathy(under_root(data_cfg.karpathy_json), under_root(data_cfg.image_dir or "."),
                                  use_restval=data_cfg.use_restval)
    if data_cfg.name == "coco_captions":
        from captioner.data.coco import load_coco_captions

        ann = root / (data_cfg.annotations or "annotations")
        return load_coco_captions([str(ann / "captions_train2014.json"), str(ann / "captions_val2014.json")],
                                  [str(root / "train2014"), str(root / "val2014")],
                                  split_file=under_root(data_cfg.karpathy_json), use_restval=data_cfg.use_restval)
    if data_cfg.name == "coco_format":
        from captioner.data.coco import load_coco_format

        return load_coco_format(under_root(data_cfg.annotations), under_root(data_cfg.image_dir or "."),
                                split_file=under_root(data_cfg.split_file), holdout=data_cfg.holdout,
                                seed=data_cfg.seed)
    raise ValueError(f"data.name={data_cfg.name!r}: choose shapes, flickr8k, coco_karpathy, coco_captions or coco_format")


def drop_empty_captions(records: dict[str, list[ImageRecord]]) -> dict[str, list[ImageRecord]]:
    """Captions with no words (empty, blank, punctuation only) are dropped, counted in a warning;
    so are images left with none (nothing to learn from or score against)."""
    from captioner.data.tokenizer import tokenize

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
