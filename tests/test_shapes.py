import hashlib

from captioner.data.shapes import CAPTIONS_PER_IMAGE, COLORS, SHAPES, load_shapes


def _digest(records):
    h = hashlib.sha1()
    for split in ("train", "val", "test"):
        for r in records[split]:
            h.update(open(r.path, "rb").read())
            h.update("|".join(r.captions).encode())
    return h.hexdigest()


def test_same_settings_give_identical_data(tmp_path):
    a = load_shapes(str(tmp_path / "a"), 12, 3, 3, image_size=48, seed=7)
    b = load_shapes(str(tmp_path / "b"), 12, 3, 3, image_size=48, seed=7)
    assert _digest(a) == _digest(b)
    assert _digest(load_shapes(str(tmp_path / "c"), 12, 3, 3, image_size=48, seed=8)) != _digest(a)


def test_splits_captions_and_content(tmp_path):
    data = load_shapes(str(tmp_path), 20, 5, 5, image_size=48)
    assert [len(data[s]) for s in ("train", "val", "test")] == [20, 5, 5]
    ids = [r.image_id for s in data.values() for r in s]
    assert len(set(ids)) == len(ids)
    for r in data["train"]:
        assert len(r.captions) == CAPTIONS_PER_IMAGE
        assert len(set(r.captions)) == CAPTIONS_PER_IMAGE  # wording varies
        text = " ".join(r.captions).lower()
        assert any(c in text for c in COLORS) and any(s in text for s in SHAPES)


def test_reuses_existing_and_regenerates_changed(tmp_path):
    first = load_shapes(str(tmp_path), 6, 2, 2, image_size=48)
    mtime = (tmp_path / "captions.json").stat().st_mtime_ns
    load_shapes(str(tmp_path), 6, 2, 2, image_size=48)
    assert (tmp_path / "captions.json").stat().st_mtime_ns == mtime
    changed = load_shapes(str(tmp_path), 8, 2, 2, image_size=48)
    assert len(changed["train"]) == 8 and changed["train"][:6][0].captions == first["train"][0].captions
