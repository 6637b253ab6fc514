"""The one evaluation path: validation during training, ``python -m captioner.evaluate`` and the
error page decode a split and score it here, always by decoding (never teacher forcing)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from captioner.data import ImageRecord
from captioner.data.vocab import Vocabulary
from captioner.decoding.captioner import decode_features
from captioner.evaluation.metrics import score_captions


def evaluate(model, features: np.ndarray, records: Sequence[ImageRecord], vocab: Vocabulary, decode_cfg,
             device, metrics: Sequence[str] = ("bleu",), tokenizer: str = "python",
             progress: bool = False, shards=None, attention: bool = False) -> tuple[dict[str, Optional[float]], list[dict]]:
    """Decode every image of a split and score against its references.

    Returns (scores, results) where results is in the COCO results format
    ``[{"image_id", "caption"}]`` (plus the score and n-best list when decoded, and with
    ``attention`` the words and their maps, as ``decode_features`` gives them).
    ``shards`` (a ``captioner.training.distributed.Dist``) splits the decoding across data-parallel
    processes: each decodes its ``part`` of the images and every one scores all of them.
    """
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
