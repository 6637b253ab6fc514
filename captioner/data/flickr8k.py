"""Flickr8k, from the original release (token file + official split lists) or Karpathy's JSON.

``image_id`` is the Flickr photo id, i.e. the numeric prefix of the file name
(``1000268201_693b08cb0e.jpg`` -> 1000268201): it is the same whichever of the two sources is read
and whichever images are present. If some file name has no numeric prefix, or two prefixes clash,
every image instead gets its index in the sorted list of all captioned file names.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

from captioner.data import ImageRecord

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
_DOWNLOAD_HINT = (
    "download Flickr8k (Flickr8k_Dataset.zip and Flickr8k_text.zip, e.g. from "
    "https://github.com/jbrownlee/Datasets/releases/tag/Flickr8k) and unpack it so that {root} "
    "holds Flickr8k.token.txt, the three Flickr_8k.*Images.txt split lists and an images/ folder"
)


def load_flickr8k(
    root: str,
    token_file: str = "Flickr8k.token.txt",
    image_dir: str = "images",
    split_files: dict[str, str] | None = None,
    karpathy_json: str | None = None,
) -> dict[str, list[ImageRecord]]:
    """Flickr8k as ``{"train", "val", "test"}`` record lists, each in split-file (or JSON) order.

    File arguments are relative to ``root`` unless absolute. With ``karpathy_json``
    (``dataset_flickr8k.json``) the token file and split lists are not read; its "restval"
    images, if any, go to train. Captions of missing images are skipped with one warning.
    """
    root_path = Path(root).expanduser()
    hint = _DOWNLOAD_HINT.format(root=root_path)
    if not root_path.is_dir():
        raise FileNotFoundError(f"Flickr8k root {root_path} does not exist: {hint}")
    images = root_path / image_dir
    if not images.is_dir():
        raise FileNotFoundError(f"Flickr8k image folder {images} does not exist: {hint}")

    if karpathy_json is not None:
        splits, captions = _read_karpathy(_existing_file(root_path / karpathy_json, hint))
    else:
        captions = _read_tokens(_existing_file(root_path / token_file, hint))
        splits = {
            split: _read_split_list(_existing_file(root_path / name, hint), captions)
            for split, name in (split_files or DEFAULT_SPLIT_FILES).items()
        }
    if set(splits) - set(SPLITS):
        raise ValueError(f"unknown Flickr8k split names {sorted(set(splits) - set(SPLITS))}; use {SPLITS}")

    missing = sorted(name for name in captions if not (images / name).is_file())
    if missing:
        log.warning("Flickr8k: %d captioned image(s) missing from %s, skipped: %s%s", len(missing),
                    images, ", ".join(missing[:5]), " ..." if len(missing) > 5 else "")
    ids = _image_ids(sorted(captions))
    absent = set(missing)
    return {
        split: [ImageRecord(ids[name], str((images / name).resolve()), captions[name])
                for name in splits.get(split, []) if name not in absent]
        for split in SPLITS
    }


def _existing_file(path: Path, hint: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"Flickr8k file {path} not found: {hint}")
    return path


def _read_tokens(path: Path) -> dict[str, list[str]]:
    """``<file>.jpg#<n>\\t<caption>`` lines -> captions per file name, ordered by ``n``."""
    numbered: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        name, hash_, n = key.rpartition("#")
        if not sep or not hash_ or not n.isdigit() or not caption.strip():
            raise ValueError(f"{path}:{line_no}: expected '<file>.jpg#<n>\\t<caption>', got {line[:80]!r}")
        numbered[name.strip()].append((int(n), caption.strip()))
    return {name: [c for _, c in sorted(pairs)] for name, pairs in numbered.items()}


def _read_split_list(path: Path, captions: dict[str, list[str]]) -> list[str]:
    names = list(dict.fromkeys(line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                               if line.strip()))
    uncaptioned = [name for name in names if name not in captions]
    if uncaptioned:
        log.warning("Flickr8k: %d file(s) in %s have no captions, skipped: %s%s", len(uncaptioned),
                    path.name, ", ".join(uncaptioned[:5]), " ..." if len(uncaptioned) > 5 else "")
    return [name for name in names if name in captions]


def _read_karpathy(path: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["images"]
        splits: dict[str, list[str]] = defaultdict(list)
        captions: dict[str, list[str]] = {}
        for entry in entries:
            name = entry["filename"]
            captions[name] = [s["raw"].strip() for s in entry["sentences"]]
            split = "train" if entry["split"] == "restval" else entry["split"]
            splits[split].append(name)
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a Karpathy dataset_flickr8k.json "
                         f"(images[*].filename/split/sentences[*].raw): {err!r}") from None
    return dict(splits), captions


def _image_ids(names: list[str]) -> dict[str, int]:
    prefixes = [name.split("_", 1)[0] for name in names]
    if all(p.isdigit() for p in prefixes) and len(set(map(int, prefixes))) == len(names):
        return {name: int(p) for name, p in zip(names, prefixes)}
    return {name: i for i, name in enumerate(names)}
