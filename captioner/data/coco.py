"""MS-COCO captions: Karpathy's split JSON, the official annotation files, or any COCO-format set.

``image_id`` is always the COCO image id (``cocoid`` in Karpathy's JSON), so records from the three
readers line up with each other and with COCO-format result files for the caption metrics.
Images whose file is missing are skipped with one warning per call.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
from collections import defaultdict
from pathlib import Path

from captioner.data import ImageRecord
from captioner.data.images import inside

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def load_coco_karpathy(dataset_json: str, image_root: str,
                       use_restval: bool = True) -> dict[str, list[ImageRecord]]:
    """Karpathy's ``dataset_coco.json``; ``path = image_root/filepath/filename``, in JSON order.

    With ``use_restval`` the 30,504 "restval" images join train (113,287 / 5,000 / 5,000);
    without, they are dropped (82,783 / 5,000 / 5,000).
    """
    root = _existing_dir(image_root, "COCO image root (holding train2014/ and val2014/)")
    splits: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    try:
        for entry in _read_karpathy(dataset_json):
            split = _karpathy_split(entry["split"], use_restval, dataset_json)
            if split is not None:
                path = inside(root, os.path.join(entry.get("filepath", ""), entry["filename"]), dataset_json)
                captions = [s["raw"].strip() for s in entry["sentences"]]
                splits[split].append(ImageRecord(int(entry["cocoid"]), str(path), captions))
    except (KeyError, TypeError) as err:
        raise ValueError(f"{dataset_json}: not a Karpathy dataset_coco.json "
                         f"(images[*].filepath/filename/cocoid/split/sentences[*].raw): {err!r}") from None
    return _drop_missing(splits, dataset_json)


def load_coco_captions(annotation_files: list[str], image_roots: list[str], split_file: str | None = None,
                       use_restval: bool = True) -> dict[str, list[ImageRecord]]:
    """Official COCO caption files (e.g. ``captions_train2014.json``, ``captions_val2014.json``).

    ``image_roots[i]`` holds the images of ``annotation_files[i]``. ``split_file`` is either
    Karpathy's ``dataset_coco.json`` (only its cocoid -> split field is used; restval as in
    :func:`load_coco_karpathy`) or a JSON ``{"train": [image ids], "val": [...], "test": [...]}``;
    records follow its order and images it does not list are dropped. Without ``split_file`` each
    annotation file is one split, named by the "train"/"val"/"test" in its file name.
    """
    if isinstance(annotation_files, str) or isinstance(image_roots, str):
        raise TypeError("annotation_files and image_roots are lists of paths, one image root per file")
    if len(annotation_files) != len(image_roots) or not annotation_files:
        raise ValueError(f"need one image root per annotation file, got {len(annotation_files)} "
                         f"annotation file(s) and {len(image_roots)} image root(s)")
    by_file = [_read_coco(ann, root) for ann, root in zip(annotation_files, image_roots)]
    if split_file is None:
        splits = {s: [] for s in SPLITS}
        for ann, records in zip(annotation_files, by_file):
            splits[_split_from_name(ann)].extend(records)
        return _drop_missing(splits, ", ".join(map(str, annotation_files)))

    records = {r.image_id: r for file_records in by_file for r in file_records}
    wanted = _read_split_ids(split_file, use_restval)
    unknown = [i for ids in wanted.values() for i in ids if i not in records]
    if unknown:
        log.warning("COCO: %d image id(s) in %s have no captions in the annotation files, skipped: %s%s",
                    len(unknown), split_file, ", ".join(map(str, unknown[:5])), " ..." if len(unknown) > 5 else "")
    splits = {s: [records[i] for i in wanted.get(s, []) if i in records] for s in SPLITS}
    return _drop_missing(splits, split_file)


def load_coco_format(captions_json: str, image_root: str, split_file: str | None = None,
                     holdout: float = 0.1, seed: int = 0) -> dict[str, list[ImageRecord]]:
    """Any COCO-format captions JSON + image folder, split by ``split_file`` or else by ``holdout``.

    ``split_file`` names each image by its ``file_name`` in the captions file (relative to
    ``image_root``) and gives its split: a ``*.json`` file is Karpathy-style (``{"images":
    [{"filename": ..., "split": ...}]}``, restval joining train; ``filepath`` is ignored because
    ``image_root`` already is the image folder), anything else is text with one ``file_name split``
    line per image (split train/val/test). Images it does not name are dropped with one warning.
    Without it, a permutation of the images (sorted by id) seeded with ``seed`` holds out
    ``round(holdout * n)`` of them, at least one, for val and as many again for test; the rest
    train. Either way each split keeps image-id order.
    """
    if split_file is None and holdout <= 0:
        raise ValueError("holdout=0 without a split file puts every image in train, leaving nothing to "
                         "validate on; set data.holdout > 0 or data.split_file")
    records = _read_coco(captions_json, image_root)
    # Splits are drawn before missing files are dropped, so a missing image never moves the others.
    if split_file is None:
        splits = _hold_out(records, holdout, seed)
    else:
        splits = _split_by_file(records, _read_split_file(split_file, image_root), split_file)
    return _drop_missing(splits, captions_json)


def _hold_out(records: list[ImageRecord], fraction: float, seed: int) -> dict[str, list[ImageRecord]]:
    n_held = max(1, round(fraction * len(records)))
    order = random.Random(seed).sample(range(len(records)), len(records))
    split_of = {i: "val" for i in order[:n_held]} | {i: "test" for i in order[n_held:2 * n_held]}
    splits: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    for i, record in enumerate(records):
        splits[split_of.get(i, "train")].append(record)
    return splits


def _split_by_file(records: list[ImageRecord], split_of: dict[str, str],
                   split_file: str) -> dict[str, list[ImageRecord]]:
    splits: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    unlisted = []
    for record in records:
        if record.path in split_of:
            splits[split_of[record.path]].append(record)
        else:
            unlisted.append(record.path)
    if unlisted:
        log.warning("COCO: %d captioned image(s) not named in %s, skipped: %s%s", len(unlisted), split_file,
                    ", ".join(unlisted[:3]), " ..." if len(unlisted) > 3 else "")
    return splits


def _read_split_file(split_file: str, image_root: str) -> dict[str, str]:
    """``split_file`` as {image path: split}, the paths built as :func:`_read_coco` builds them."""
    root = _existing_dir(image_root, "image folder")
    if Path(split_file).suffix.lower() == ".json":
        try:
            named = [(e["filename"], _karpathy_split(e["split"], True, split_file))
                     for e in _read_karpathy(split_file)]
        except (KeyError, TypeError) as err:
            raise ValueError(f"{split_file}: Karpathy-style images need 'filename' and 'split': {err!r}") from None
    else:
        named = _read_split_lines(split_file)
    split_of: dict[str, str] = {}
    for name, split in named:
        path = inside(root, name, split_file)
        if split_of.setdefault(path, split) != split:
            raise ValueError(f"{split_file}: {name} is listed under both {split_of[path]} and {split}")
    return split_of


def _read_split_lines(split_file: str) -> list[tuple[str, str]]:
    try:
        text = _existing_file(split_file, "split file").read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{split_file}: not a text file of 'file_name split' lines: {err}") from None
    named = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.strip().rsplit(maxsplit=1)  # from the right: file names may contain spaces
        if len(fields) != 2:
            raise ValueError(f"{split_file}:{lineno}: expected 'file_name split', got {line.strip()!r}")
        if fields[1] not in SPLITS:
            raise ValueError(f"{split_file}:{lineno}: unknown split {fields[1]!r}; expected train/val/test")
        named.append((fields[0], fields[1]))
    return named


def _read_coco(annotation_file: str, image_root: str) -> list[ImageRecord]:
    """One COCO captions file -> records sorted by image id, captions in annotation-id order."""
    from pycocotools.coco import COCO  # only the COCO-file readers need it

    ann_path = _existing_file(annotation_file, "COCO captions file")
    root = _existing_dir(image_root, f"image folder for {ann_path.name}")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        try:
            coco = COCO(str(ann_path))
        except (AssertionError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"{ann_path}: not a COCO-format file ({{'images': [...], 'annotations': "
                             f"[...]}}): {err!r}") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{ann_path} is not UTF-8 text (byte {err.start}): is it the right file?") from None
        except RecursionError:
            raise ValueError(f"{ann_path} nests its values too deeply to be a COCO captions file") from None
    bad_ids = [i for i in coco.imgs if not isinstance(i, int)]
    if bad_ids:
        raise ValueError(f"{ann_path}: image ids must be integers, got e.g. {bad_ids[0]!r}")
    records, uncaptioned = [], []
    for image_id in sorted(coco.imgs):
        anns = sorted(coco.imgToAnns.get(image_id, []), key=lambda a: a.get("id", 0))
        if anns and "caption" not in anns[0]:
            raise ValueError(f"{ann_path}: annotations have no 'caption' field; is this a captions_*.json file?")
        if not anns:
            uncaptioned.append(image_id)
            continue
        captions = [a["caption"] for a in anns]
        bad = [c for c in captions if not isinstance(c, str)]
        if bad:
            raise ValueError(f"{ann_path}: image {image_id} has a caption {bad[0]!r}, not a string")
        path = inside(root, coco.imgs[image_id].get("file_name"), str(ann_path))
        records.append(ImageRecord(int(image_id), path, [c.strip() for c in captions]))
    if uncaptioned:
        log.warning("COCO: %d image(s) in %s have no captions, skipped: %s%s", len(uncaptioned), ann_path,
                    ", ".join(map(str, uncaptioned[:5])), " ..." if len(uncaptioned) > 5 else "")
    return records


def _read_karpathy(path: str) -> list[dict]:
    try:
        return json.loads(_existing_file(path, "Karpathy split file").read_text(encoding="utf-8"))["images"]
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a Karpathy dataset_coco.json ({{'images': [...]}}): {err!r}") from None


def _karpathy_split(split: str, use_restval: bool, source: str) -> str | None:
    if split == "restval":
        return "train" if use_restval else None
    if split not in SPLITS:
        raise ValueError(f"{source}: unknown split {split!r}; expected train/val/test/restval")
    return split


def _read_split_ids(split_file: str, use_restval: bool) -> dict[str, list[int]]:
    try:
        data = json.loads(_existing_file(split_file, "split file").read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{split_file}: not valid JSON: {err}") from None
    if isinstance(data, dict) and "images" in data:
        wanted: dict[str, list[int]] = defaultdict(list)
        try:
            for entry in data["images"]:
                split = _karpathy_split(entry["split"], use_restval, split_file)
                if split is not None:
                    wanted[split].append(int(entry["cocoid"]))
        except (KeyError, TypeError) as err:
            raise ValueError(f"{split_file}: Karpathy images need 'cocoid' and 'split': {err!r}") from None
        return dict(wanted)
    if (not isinstance(data, dict) or not set(data) <= set(SPLITS)
            or not all(isinstance(ids, list) and all(isinstance(i, int) for i in ids) for ids in data.values())):
        raise ValueError(f"{split_file}: expected Karpathy's dataset_coco.json or "
                         '{"train": [image ids], "val": [...], "test": [...]}')
    return data


def _split_from_name(annotation_file: str) -> str:
    found = [s for s in SPLITS if s in Path(annotation_file).name]
    if len(found) != 1:
        raise ValueError(f"cannot tell the split of {annotation_file} from its name; pass split_file")
    return found[0]


def _drop_missing(splits: dict[str, list[ImageRecord]], source: str) -> dict[str, list[ImageRecord]]:
    missing = [r for records in splits.values() for r in records if not Path(r.path).is_file()]
    if not missing:
        return splits
    log.warning("COCO: %d image file(s) listed in %s are missing, skipped: %s%s", len(missing), source,
                ", ".join(r.path for r in missing[:3]), " ..." if len(missing) > 3 else "")
    gone = {id(r) for r in missing}
    return {s: [r for r in records if id(r) not in gone] for s, records in splits.items()}


def _existing_file(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p} not found; scripts/download_coco.sh fetches the COCO 2014 "
                                "images, caption annotations and Karpathy's split")
    return p


def _existing_dir(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise FileNotFoundError(f"{what} {p} not found; scripts/download_coco.sh fetches the COCO 2014 "
                                "images, caption annotations and Karpathy's split")
    return p
