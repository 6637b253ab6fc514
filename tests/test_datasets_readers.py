"""Flickr8k and COCO readers, on miniature copies of the real file formats."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from PIL import Image

from captioner.data import ImageRecord
from captioner.data.coco import load_coco_captions, load_coco_format, load_coco_karpathy
from captioner.data.flickr8k import load_flickr8k

REAL_FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"
MISSING_FLICKR = "2258277193_586949ec62.jpg"


def _images(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (4, 4), (200, 10, 10)).save(folder / name, format="PNG")


def _write(path: Path, text: str | object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if isinstance(text, str) else json.dumps(text), encoding="utf-8")
    return path


def _ids(split: list[ImageRecord]) -> list[int]:
    return [r.image_id for r in split]


# --- Flickr8k -------------------------------------------------------------------------------

@pytest.fixture
def flickr(tmp_path: Path) -> Path:
    names = ["101_a.jpg", "102_b.jpg", "103_c.jpg", "104_d.jpg"]
    _images(tmp_path / "images", *names)
    tokens = [f"{n}#{i}\t{n[:3]} caption {i} ." for n in names for i in (1, 0)]  # out of order on purpose
    tokens += [f"{MISSING_FLICKR}#{i}\tno image {i}" for i in range(2)]
    _write(tmp_path / "Flickr8k.token.txt", "\n".join(tokens) + "\n\n")
    _write(tmp_path / "Flickr_8k.trainImages.txt", "102_b.jpg\n101_a.jpg\n" + MISSING_FLICKR + "\n")
    _write(tmp_path / "Flickr_8k.devImages.txt", "103_c.jpg\n")
    _write(tmp_path / "Flickr_8k.testImages.txt", "104_d.jpg\n999_uncaptioned.jpg\n")
    return tmp_path


def test_flickr8k_token_file(flickr: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        data = load_flickr8k(str(flickr))
    assert {k: _ids(v) for k, v in data.items()} == {"train": [102, 101], "val": [103], "test": [104]}
    first = data["train"][0]
    assert first.path == str((flickr / "images" / "102_b.jpg").resolve())
    assert first.captions == ["102 caption 0 .", "102 caption 1 ."]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert any("1 captioned image(s) missing" in w and MISSING_FLICKR in w for w in warnings)
    assert any("999_uncaptioned.jpg" in w and "no captions" in w for w in warnings)


def test_flickr8k_karpathy_json(flickr: Path) -> None:
    def entry(name: str, split: str) -> dict:
        return {"filename": name, "imgid": 0, "split": split,
                "sentences": [{"raw": f"{name} one", "tokens": []}, {"raw": f"{name} two", "tokens": []}]}

    _write(flickr / "dataset_flickr8k.json", {"images": [
        entry("101_a.jpg", "train"), entry("102_b.jpg", "restval"), entry("103_c.jpg", "val"),
        entry("104_d.jpg", "test"), entry(MISSING_FLICKR, "train")]})
    data = load_flickr8k(str(flickr), karpathy_json="dataset_flickr8k.json")
    assert {k: _ids(v) for k, v in data.items()} == {"train": [101, 102], "val": [103], "test": [104]}
    assert data["test"][0].captions == ["104_d.jpg one", "104_d.jpg two"]


def test_flickr8k_ids_fall_back_to_sorted_index(tmp_path: Path) -> None:
    _images(tmp_path / "images", "dog.jpg", "cat.jpg")
    _write(tmp_path / "Flickr8k.token.txt", "dog.jpg#0\ta dog\ncat.jpg#0\ta cat\n")
    for name in ("Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt", "Flickr_8k.testImages.txt"):
        _write(tmp_path / name, "dog.jpg\ncat.jpg\n")
    assert _ids(load_flickr8k(str(tmp_path))["train"]) == [1, 0]


def test_flickr8k_missing_files_say_what_to_download(tmp_path: Path, flickr: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere.*download Flickr8k"):
        load_flickr8k(str(tmp_path / "nowhere"))
    (flickr / "Flickr8k.token.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"Flickr8k\.token\.txt not found.*download"):
        load_flickr8k(str(flickr))


def test_flickr8k_bad_token_line(flickr: Path) -> None:
    _write(flickr / "Flickr8k.token.txt", "101_a.jpg#0\tfine\n101_a.jpg a caption without tab\n")
    with pytest.raises(ValueError, match=r"Flickr8k\.token\.txt:2: expected"):
        load_flickr8k(str(flickr))


@pytest.mark.skipif(not REAL_FLICKR8K.is_dir(), reason=f"{REAL_FLICKR8K} not present")
def test_real_flickr8k(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        data = load_flickr8k(str(REAL_FLICKR8K))
    assert {k: len(v) for k, v in data.items()} == {"train": 6000, "val": 1000, "test": 1000}
    records = [r for split in data.values() for r in split]
    assert all(len(r.captions) == 5 for r in records)
    assert len({r.image_id for r in records}) == 8000
    assert 2258277193 not in {r.image_id for r in records}
    assert all(Path(r.path).is_absolute() for r in records)
    assert "2258277193_586949ec62" in caplog.text


# --- COCO -----------------------------------------------------------------------------------

def _karpathy_entry(cocoid: int, split: str) -> dict:
    folder = "train2014" if split == "train" else "val2014"
    return {"filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "cocoid": cocoid, "imgid": 0,
            "split": split, "sentences": [{"raw": f"image {cocoid} a", "tokens": []},
                                          {"raw": f" image {cocoid} b ", "tokens": []}]}


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    """Karpathy JSON over 7 images (2 train, 2 restval, 1 val, 2 test) plus the two COCO files."""
    splits = {1: "train", 2: "train", 3: "restval", 4: "restval", 5: "val", 6: "test", 7: "test"}
    entries = [_karpathy_entry(i, s) for i, s in splits.items()]
    _write(tmp_path / "dataset_coco.json", {"images": entries})
    for e in entries:
        _images(tmp_path / e["filepath"], e["filename"])
    for part in ("train", "val"):
        files = [e for e in entries if e["filepath"] == f"{part}2014"]
        _write(tmp_path / "annotations" / f"captions_{part}2014.json", {
            "info": {}, "licenses": [],
            "images": [{"id": e["cocoid"], "file_name": e["filename"], "width": 4, "height": 4} for e in files],
            # ids descending so the reader has to sort captions by annotation id
            "annotations": [{"id": 100 - 10 * e["cocoid"] - k, "image_id": e["cocoid"], "caption": f"c{e['cocoid']}{k}"}
                            for e in files for k in (1, 0)]})
    return tmp_path


def test_coco_karpathy_restval_goes_to_train(coco: Path) -> None:
    data = load_coco_karpathy(str(coco / "dataset_coco.json"), str(coco))
    assert {k: _ids(v) for k, v in data.items()} == {"train": [1, 2, 3, 4], "val": [5], "test": [6, 7]}
    r = data["val"][0]
    assert r.path == str(coco / "val2014" / "COCO_val2014_000000000005.jpg")
    assert r.captions == ["image 5 a", "image 5 b"]
    without = load_coco_karpathy(str(coco / "dataset_coco.json"), str(coco), use_restval=False)
    assert {k: len(v) for k, v in without.items()} == {"train": 2, "val": 1, "test": 2}


def test_coco_karpathy_skips_missing_images(coco: Path, caplog: pytest.LogCaptureFixture) -> None:
    (coco / "val2014" / "COCO_val2014_000000000006.jpg").unlink()
    with caplog.at_level(logging.WARNING):
        data = load_coco_karpathy(str(coco / "dataset_coco.json"), str(coco))
    assert _ids(data["test"]) == [7]
    assert "1 image file(s)" in caplog.text and "000000000006" in caplog.text


def test_coco_format_all_test_split_quietly(coco: Path, capsys: pytest.CaptureFixture[str]) -> None:
    val2014 = coco / "val2014"
    split_file = _write(coco / "all_test.txt", "".join(f"{p.name} test\n" for p in sorted(val2014.iterdir())))
    data = load_coco_format(str(coco / "annotations" / "captions_val2014.json"), str(val2014),
                            split_file=str(split_file))
    assert capsys.readouterr().out == ""  # pycocotools' progress lines are swallowed
    assert data["train"] == [] and data["val"] == []
    assert _ids(data["test"]) == [3, 4, 5, 6, 7]
    assert data["test"][0].captions == ["c31", "c30"]
    assert data["test"][0].path == str(val2014 / "COCO_val2014_000000000003.jpg")


@pytest.fixture
def coco_format(tmp_path: Path) -> Path:
    """A COCO-format set of 20 images, ids 1..20, listed in the captions file in reverse."""
    names = {i: f"img {i:02d}.png" for i in range(20, 0, -1)}  # a space, for the text split file
    _images(tmp_path / "images", *names.values())
    _write(tmp_path / "captions.json", {
        "images": [{"id": i, "file_name": name} for i, name in names.items()],
        "annotations": [{"id": i, "image_id": i, "caption": f"picture {i}"} for i in names]})
    return tmp_path


def _load_coco_format(folder: Path, **kwargs) -> dict[str, list[ImageRecord]]:
    return load_coco_format(str(folder / "captions.json"), str(folder / "images"), **kwargs)


def test_coco_format_holdout_is_deterministic_and_disjoint(coco_format: Path) -> None:
    data = _load_coco_format(coco_format, holdout=0.2, seed=3)
    assert {k: len(v) for k, v in data.items()} == {"train": 12, "val": 4, "test": 4}
    splits = [set(_ids(v)) for v in data.values()]
    assert set.union(*splits) == set(range(1, 21)) and sum(map(len, splits)) == 20
    assert all(_ids(v) == sorted(_ids(v)) for v in data.values())
    assert _load_coco_format(coco_format, holdout=0.2, seed=3) == data
    assert _load_coco_format(coco_format, holdout=0.2, seed=4) != data
    tiny = _load_coco_format(coco_format, holdout=0.01)
    assert {k: len(v) for k, v in tiny.items()} == {"train": 18, "val": 1, "test": 1}


def test_coco_format_holdout_zero_needs_split_file(coco_format: Path) -> None:
    one_line = r"^holdout=0 without a split file.*set data\.holdout > 0 or data\.split_file$"
    with pytest.raises(ValueError, match=one_line):
        _load_coco_format(coco_format, holdout=0.0)


def test_coco_format_text_split_file(coco_format: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = ["img 03.png  val", "", "img 01.png train", "  img 02.png train  ", "img 04.png test"]
    split_file = _write(coco_format / "splits.txt", "\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        data = _load_coco_format(coco_format, split_file=str(split_file), holdout=0.0)
    assert {k: _ids(v) for k, v in data.items()} == {"train": [1, 2], "val": [3], "test": [4]}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "16 captioned image(s) not named in" in warnings[0]


def test_coco_format_karpathy_split_file(coco_format: Path) -> None:
    splits = {1: "train", 2: "restval", 3: "val", 4: "test", 5: "test"}
    split_file = _write(coco_format / "dataset.json", {"images": [
        {"filepath": "ignored", "filename": f"img {i:02d}.png", "split": s} for i, s in splits.items()]})
    data = _load_coco_format(coco_format, split_file=str(split_file))
    assert {k: _ids(v) for k, v in data.items()} == {"train": [1, 2], "val": [3], "test": [4, 5]}


def test_coco_format_bad_split_files_name_the_file(coco_format: Path) -> None:
    text = _write(coco_format / "splits.txt", "img 01.png train\nimg 02.png dev\n")
    unknown = "unknown split 'dev'; expected train/val/test"
    with pytest.raises(ValueError, match=rf"^{re.escape(str(text))}:2: {unknown}$"):
        _load_coco_format(coco_format, split_file=str(text))
    karpathy = _write(coco_format / "dataset.json", {"images": [{"filename": "img 01.png", "split": "dev"}]})
    with pytest.raises(ValueError, match=rf"^{re.escape(str(karpathy))}: {unknown}/restval$"):
        _load_coco_format(coco_format, split_file=str(karpathy))
    with pytest.raises(ValueError, match=r"broken\.json: not a Karpathy"):
        _load_coco_format(coco_format, split_file=str(_write(coco_format / "broken.json", "{not json")))
    absent = coco_format / "absent.txt"
    with pytest.raises(FileNotFoundError, match=rf"^split file {re.escape(str(absent))} not found"):
        _load_coco_format(coco_format, split_file=str(absent))
    twice = _write(coco_format / "twice.txt", "img 01.png train\nimg 01.png test\n")
    with pytest.raises(ValueError, match=r"twice\.txt: img 01\.png is listed under both train and test"):
        _load_coco_format(coco_format, split_file=str(twice))


def test_coco_format_rejects_non_caption_files(tmp_path: Path) -> None:
    _images(tmp_path, "x.jpg")
    instances = {"images": [{"id": 1, "file_name": "x.jpg"}],
                 "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 1, 1], "category_id": 1}]}
    with pytest.raises(ValueError, match="no 'caption' field"):
        load_coco_format(str(_write(tmp_path / "instances.json", instances)), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="COCO captions file .*absent.json not found"):
        load_coco_format(str(tmp_path / "absent.json"), str(tmp_path))


def test_coco_captions_with_karpathy_split(coco: Path) -> None:
    anns = [str(coco / "annotations" / f"captions_{p}2014.json") for p in ("train", "val")]
    roots = [str(coco / "train2014"), str(coco / "val2014")]
    data = load_coco_captions(anns, roots, split_file=str(coco / "dataset_coco.json"))
    assert {k: _ids(v) for k, v in data.items()} == {"train": [1, 2, 3, 4], "val": [5], "test": [6, 7]}
    assert data["train"][0].captions == ["c11", "c10"]  # official captions, not Karpathy's
    data = load_coco_captions(anns, roots, split_file=str(coco / "dataset_coco.json"), use_restval=False)
    assert _ids(data["train"]) == [1, 2]


def test_coco_captions_with_id_lists_and_file_names(coco: Path, caplog: pytest.LogCaptureFixture) -> None:
    anns = [str(coco / "annotations" / f"captions_{p}2014.json") for p in ("train", "val")]
    roots = [str(coco / "train2014"), str(coco / "val2014")]
    split_file = _write(coco / "splits.json", {"train": [2, 1, 3], "test": [7, 42]})
    with caplog.at_level(logging.WARNING):
        data = load_coco_captions(anns, roots, split_file=str(split_file))
    assert {k: _ids(v) for k, v in data.items()} == {"train": [2, 1, 3], "val": [], "test": [7]}
    assert "42" in caplog.text
    by_name = load_coco_captions(anns, roots)
    assert {k: _ids(v) for k, v in by_name.items()} == {"train": [1, 2], "val": [3, 4, 5, 6, 7], "test": []}
    with pytest.raises(ValueError, match="one image root per annotation file"):
        load_coco_captions(anns, roots[:1])
    with pytest.raises(ValueError, match="expected Karpathy's dataset_coco.json or"):
        load_coco_captions(anns, roots, split_file=str(_write(coco / "bad.json", {"dev": [1]})))
