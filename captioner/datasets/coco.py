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
from collections import defaultdict
from pathlib import Path

from captioner.datasets import ImageRecord

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
                path = root / entry.get("filepath", "") / entry["filename"]
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


def load_coco_format(captions_json: str, image_root: str, split: str = "test") -> dict[str, list[ImageRecord]]:
    """Any COCO-format captions JSON + image folder as one split (the other two are empty)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    splits: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    splits[split] = _read_coco(captions_json, image_root)
    return _drop_missing(splits, captions_json)


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
        path = root / coco.imgs[image_id]["file_name"]
        records.append(ImageRecord(int(image_id), str(path), [a["caption"].strip() for a in anns]))
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
