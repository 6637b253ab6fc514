"""Data sets as lists of captioned images, one list per split.

Every source (the embedded shapes set, Flickr8k, COCO, any COCO-format set) returns the same
plain structure, so the rest of the pipeline never branches on where the data came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ImageRecord:
    """One image and its reference captions. ``path`` is absolute."""

    image_id: int
    path: str
    captions: list[str] = field(default_factory=list)
