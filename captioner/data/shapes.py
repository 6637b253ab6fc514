"""The embedded default data set: procedurally generated scenes of coloured shapes.

Ships as code, not files: images and captions are a pure function of the settings and the seed,
generated under ``data/shapes`` on first use. Each scene has 1-3 shapes laid out left to right;
each image gets five captions that vary wording, order and detail the way human captions do, so
BLEU behaves as on real data. Colour, shape, size and order are only in the pixels: a model that
ignores the image cannot know them.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw

from captioner.data import ImageRecord
from captioner.io import atomic_write, atomic_write_text

COLORS = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 210, 40),
    "purple": (135, 45, 165),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.075, "large": 0.14}  # radius as a fraction of the image side
CAPTIONS_PER_IMAGE = 5
VERSION = 1  # bump when the generator changes, so old caches are rebuilt

TEMPLATES = {
    1: [
        "a {A}",
        "there is a {A} in the picture",
        "a {A} on a plain background",
        "one {A}",
        "a single {A}",
        "a picture of a {A}",
    ],
    2: [
        "a {A} and a {B}",
        "a {A} to the left of a {B}",
        "a {B} to the right of a {A}",
        "two shapes : a {A} and a {B}",
        "a {A} next to a {B}",
        "a {A} beside a {B}",
    ],
    3: [
        "a {A} , a {B} and a {C}",
        "three shapes : a {A} , a {B} and a {C}",
        "a {A} to the left of a {B} and a {C}",
        "a {A} , a {B} , and a {C} in a row",
        "a {C} to the right of a {A} and a {B}",
        "a row of three shapes : a {A} , a {B} and a {C}",
    ],
}


def _scene(rng: random.Random, size: int) -> tuple[Image.Image, list[dict]]:
    n = rng.choices((1, 2, 3), weights=(3, 4, 3))[0]
    gray = rng.randint(70, 190)
    image = Image.new("RGB", (size, size), (gray, gray, gray))
    draw = ImageDraw.Draw(image)
    objects = []
    column = size / n  # one column per shape keeps "left of" unambiguous
    for i in range(n):
        obj = {"color": rng.choice(list(COLORS)), "shape": rng.choice(SHAPES), "size": rng.choice(list(SIZES))}
        r = SIZES[obj["size"]] * size
        cx = column * (i + 0.5) + rng.uniform(-1, 1) * max(0.0, column / 2 - r - 2)
        cy = rng.uniform(r + size * 0.12, size - r - size * 0.12)
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse(box, fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
        objects.append(obj)
    return image, objects


def _captions(rng: random.Random, objects: list[dict]) -> list[str]:
    captions = []
    for template in rng.sample(TEMPLATES[len(objects)], CAPTIONS_PER_IMAGE):
        with_size = rng.random() < 0.7  # people mention size some of the time
        phrases = {
            key: (f"{o['size']} " if with_size else "") + f"{o['color']} {o['shape']}"
            for key, o in zip("ABC", objects)
        }
        caption = template.format(**phrases)
        if rng.random() < 0.5:  # capitals and full stops, as in real caption files
            caption = caption[0].upper() + caption[1:] + "."
        captions.append(caption)
    return captions


MARKER = ".captioner-shapes"  # in a folder the generator made: it may write there again


def _index(index_file: Path) -> Optional[dict]:
    """The generator's own captions.json, or None when the file is not one it wrote."""
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if isinstance(index, dict) and isinstance(index.get("settings"), dict) and isinstance(index.get("splits"), dict):
        return index
    return None


def claim_folder(root: Path) -> None:
    """Write ``MARKER`` into ``root`` unless it is a folder the generator did not make: one that
    holds anything but its marker, its captions.json (a data set generated before the marker
    existed), ``images/`` and the feature cache. Such a folder is the user's, and nothing is
    written into it (ValueError naming it)."""
    if (root / MARKER).is_file():
        return
    if root.is_dir() and any(root.iterdir()):
        ours = (root / "captions.json").is_file() and _index(root / "captions.json") is not None
        strangers = [p.name for p in sorted(root.iterdir()) if p.name not in ("captions.json", "images", "features")]
        if not ours or strangers:
            raise ValueError(f"data.root={root} is not a folder the shapes generator made (it holds "
                             f"{', '.join(strangers[:3] or ['captions.json'])}{', ...' if len(strangers) > 3 else ''}): "
                             "nothing was written there; give data.root an empty or new folder, or choose your data "
                             "set with data=NAME (flickr8k, coco, coco_format)")
    atomic_write_text(root / MARKER, "this folder was made by captioner's shapes generator; it may rewrite it\n")


def load_shapes(
    root: str, num_train: int = 3000, num_val: int = 300, num_test: int = 300, image_size: int = 128, seed: int = 0,
    generate: bool = True,
) -> dict[str, list[ImageRecord]]:
    """Generate the data set under ``root`` unless an identical one is there, and return it. The
    generator writes only into an empty folder or one it made (``claim_folder``); with
    ``generate=False`` (a root a stranger's checkpoint names) it writes nothing, and a data set
    that is not there whole is a ValueError."""
    root_path = Path(root).resolve()
    settings = {"version": VERSION, "num": [num_train, num_val, num_test], "image_size": image_size, "seed": seed}
    index_file = root_path / "captions.json"
    index = _index(index_file) if index_file.exists() else None
    if index is not None and index["settings"] == settings and all(
            (root_path / r["file"]).exists() for s in index["splits"].values() for r in s):
        return _records(root_path, index)
    if not generate:
        raise ValueError(f"data.root={root} holds no shapes data set of these settings, and it is a folder the "
                         "checkpoint names, which is only read: give data.root=ANOTHER_DIR, or generate it there "
                         f"yourself with `python -m captioner.extract data.root={root}`")
    claim_folder(root_path)

    splits: dict[str, list[dict]] = {}
    image_id = 0
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        splits[split] = []
        for i in range(count):
            # one generator per image: any image can be regenerated alone, in any order
            rng = random.Random(f"{seed}/{split}/{i}")
            image, objects = _scene(rng, image_size)
            file = f"images/{split}_{i:05d}.png"
            atomic_write(root_path / file, lambda tmp: image.save(tmp, format="PNG"))
            splits[split].append({"image_id": image_id, "file": file, "captions": _captions(rng, objects), "objects": objects})
            image_id += 1
    index = {"settings": settings, "splits": splits}
    atomic_write_text(index_file, json.dumps(index))  # written last: its presence means "complete"
    return _records(root_path, index)


def _records(root: Path, index: dict) -> dict[str, list[ImageRecord]]:
    return {
        split: [ImageRecord(r["image_id"], str(root / r["file"]), r["captions"]) for r in rows]
        for split, rows in index["splits"].items()
    }
