"""Where an attention decoder looked: each word of a caption over the image, lit where it attended.

An attention map is the decoder's weights over the encoder's square grid of regions (row-major,
``side x side``), for the image the network read (its centre crop, ``Encoder.crop``). A tile is
that crop with the map upsampled over it (bilinear) and scaled to its maximum, the image kept
bright where the weight is high and dimmed elsewhere, as in Xu et al.'s figures. A strip is the
crop followed by one tile per word, each word written under its tile.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

DIM = 0.25  # brightness where the model did not look at all
LABEL_HEIGHT = 18


def tile(view: Image.Image, weights: Sequence[float], size: int = 112) -> Image.Image:
    """``view`` (the crop the network read) lit by one attention map over its regions."""
    weights = np.asarray(weights, dtype=np.float32)
    side = math.isqrt(len(weights))
    if side * side != len(weights):
        raise ValueError(f"{len(weights)} regions do not form a square grid")
    image = view.convert("RGB").resize((size, size), Image.BICUBIC)
    heat = Image.fromarray(weights.reshape(side, side) / max(float(weights.max()), 1e-12), mode="F")
    light = np.asarray(heat.resize((size, size), Image.BILINEAR), dtype=np.float32).clip(0.0, 1.0)
    lit = np.asarray(image, dtype=np.float32) * (DIM + (1.0 - DIM) * light[:, :, None])
    return Image.fromarray(lit.round().astype(np.uint8))


def strip(view: Image.Image, words: Sequence[str], maps: Sequence[Sequence[float]], size: int = 112) -> Image.Image:
    """One image: the crop, then a tile per word (``maps[i]`` is the map read before ``words[i]``)."""
    tiles = [view.convert("RGB").resize((size, size), Image.BICUBIC)] + [tile(view, m, size) for m in maps]
    out = Image.new("RGB", (len(tiles) * (size + 4), size + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(out)
    for i, (image, word) in enumerate(zip(tiles, ["", *words])):
        x = i * (size + 4)
        out.paste(image, (x, 0))
        draw.text((x + size // 2, size + 2), word, fill="black", anchor="ma")
    return out
