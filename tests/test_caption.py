"""Captioning a folder: every readable image captioned, every unreadable one named, clear errors,
and a gallery page that renders offline. A tiny untrained checkpoint, CPU only."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from captioner.training.checkpoint import save_checkpoint
from captioner.encoding.encoders import ENCODER_DIMS
from captioner.models import build_model
from captioner.data.vocab import SPECIALS, Vocabulary
from conftest import compose_config

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
GOOD = ["exif_rotated.jpg", "gray.png", "palette.gif", "rgba.png", "cmyk.jpg", "sixteen_bit.png", "photo.webp",
        "photo.tiff", "photo.bmp", "nested/deeper/inner.JPEG"]
BAD = ["truncated.jpg", "not_an_image.jpg", "empty.png"]


def untrained_checkpoint(path: Path, *overrides) -> Path:
    """A checkpoint in the format training writes, with nothing trained: random decoder weights and
    an encoder with random weights (encoder.pretrained=false), so no download is needed."""
    cfg = compose_config("train", ["encoder.pretrained=false", "model.embed_dim=16", "model.hidden_dim=24", *overrides])
    vocab = Vocabulary([*SPECIALS, "a", "red", "blue", "square", "circle", "on", "the", "left"])
    torch.manual_seed(0)
    feature_dim = ENCODER_DIMS[cfg.encoder.name]
    model = build_model(cfg.model, len(vocab), feature_dim)
    save_checkpoint(path, {"config": OmegaConf.to_container(cfg, resolve=True), "vocab": vocab.to_dict(),
                           "model": model.state_dict(), "feature_dim": feature_dim, "step": 0, "epoch": 0})
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")


def loaded_images(page: Path, tmp_path: Path) -> str:
    """"loaded/total" of the images of ``page`` as headless Chromium renders it, offline."""
    probe = """<script>addEventListener('load', () => { const all = [...document.images];
      document.body.setAttribute('data-loaded', all.filter(i => i.complete && i.naturalWidth > 0).length
        + '/' + all.length); });</script>"""
    copy = tmp_path / "probe.html"
    copy.write_text(page.read_text().replace("</body>", probe + "</body>"))
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--dump-dom", copy.as_uri()], capture_output=True, text=True, timeout=120).stdout
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
    return dom


def make_folder(root: Path) -> Path:
    """Every kind of image the loader must handle, three broken files and a nested sub-folder.
    The folder name has a space, as real photo folders do."""
    folder = root / "my photos"
    (folder / "nested" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (48, 72, 3), dtype=np.uint8))  # 72 wide, 48 high
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    base.save(folder / "exif_rotated.jpg", exif=exif)
    base.convert("L").save(folder / "gray.png")
    base.convert("P").save(folder / "palette.gif")
    base.convert("RGBA").save(folder / "rgba.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (48, 72)).astype(np.uint16)).save(folder / "sixteen_bit.png")
    base.save(folder / "photo.webp")
    base.save(folder / "photo.tiff")
    base.save(folder / "photo.bmp")
    base.save(folder / "nested" / "deeper" / "inner.JPEG")
    data = (folder / "exif_rotated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "not_an_image.jpg").write_text("this is text, not a JPEG\n")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image extension: ignored\n")
    assert Image.open(folder / "sixteen_bit.png").mode.startswith("I;16")
    assert Image.open(folder / "cmyk.jpg").mode == "CMYK"
    return folder


def run_cli(*args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": ""}
    return subprocess.run([sys.executable, "-m", "captioner.caption", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_captions_every_readable_image_and_names_the_rest(tmp_path, checkpoint):
    folder = make_folder(tmp_path)
    out = tmp_path / "out" / "captions.json"
    # two decoding workers and small batches: a bad file must not break a worker or a batch
    result = run_cli(folder, f"checkpoint={checkpoint}", f"output={out}", "html=true", "progress=false",
                     "num_workers=2", "batch_size=4", "decode=beam", "decode.beam_size=3", "decode.n_best=2",
                     "decode.max_length=6", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr

    captions = json.loads(out.read_text())
    assert sorted(c["file_name"] for c in captions) == sorted(GOOD)
    assert len({c["image_id"] for c in captions}) == len(captions)
    for c in captions:
        assert isinstance(c["image_id"], int) and isinstance(c["caption"], str) and c["score"] <= 0
        assert len(c["caption"].split()) <= 6
        assert len(c["n_best"]) == 2 and c["n_best"][0] == {"caption": c["caption"], "score": c["score"]}
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == len(BAD)
    for name in BAD:  # one warning line each, and the summary lists them
        assert sum(name in line for line in warnings) == 1
        assert f"  {name}" in result.stdout.splitlines()
    assert f"captioned {len(GOOD)} of {len(GOOD) + len(BAD)} images" in result.stdout
    assert not list(tmp_path.glob("outputs")) and not list(tmp_path.glob("*.log"))  # no Hydra litter

    page = (out.with_suffix(".html")).read_text()
    assert page.count('src="data:image/jpeg;base64,') == len(GOOD)
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing fetched from elsewhere: opens offline
    # the EXIF orientation was applied: the 72x48 photo shows upright as 48 wide, 72 high
    figure = next(f for f in page.split("<figure>") if "exif_rotated.jpg" in f)
    assert 'width="48" height="72"' in figure


def test_plain_greedy_run_writes_coco_results_without_n_best(tmp_path, checkpoint):
    folder = tmp_path / "one"
    folder.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "red.png")
    result = run_cli(f"folder={folder}", f"checkpoint={checkpoint}", "progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (entry,) = json.loads((tmp_path / "captions.json").read_text())  # default output: ./captions.json
    assert set(entry) == {"image_id", "file_name", "caption", "score"}
    assert not (tmp_path / "captions.html").exists()


@pytest.mark.parametrize("case", ["empty folder", "missing checkpoint", "typo in a key", "no readable image"])
def test_cli_errors_are_one_line(tmp_path, checkpoint, case):
    folder = tmp_path / "images"
    folder.mkdir()
    args = [folder, f"checkpoint={checkpoint}", "progress=false"]
    if case == "missing checkpoint":
        Image.new("RGB", (16, 16)).save(folder / "a.png")
        args[1] = f"checkpoint={tmp_path / 'nope.pt'}"
    elif case == "typo in a key":
        args.append("decode.beam_sise=3")
    elif case == "no readable image":
        (folder / "fake.jpg").write_text("text")
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    expected = {"empty folder": "no image files", "missing checkpoint": "checkpoint not found",
                "typo in a key": "beam_sise", "no readable image": "could be read"}[case]
    assert expected in errors[0]
    assert not (tmp_path / "captions.json").exists()


def test_python_api_takes_paths_and_pil_images(tmp_path, checkpoint):
    from captioner import Captioner

    folder = make_folder(tmp_path)
    before = torch.get_rng_state()
    captioner = Captioner.from_checkpoint(checkpoint, device="cpu")
    assert torch.equal(torch.get_rng_state(), before)  # the random encoder is drawn in a forked RNG
    path = folder / "photo.bmp"
    with Image.open(path) as opened:
        results = captioner.caption_images([path, opened, folder / "empty.png", Image.open(folder / "gray.png")],
                                           method="beam", beam_size=2, max_length=5)
    assert [r["file_name"] for r in results] == [str(path), str(path), str(folder / "empty.png"),
                                                 str(folder / "gray.png")]
    assert results[0]["caption"] == results[1]["caption"] and results[0]["score"] == results[1]["score"]
    assert "error" in results[2] and "caption" not in results[2]
    assert "caption" in results[3]
    again = Captioner.from_checkpoint(checkpoint, device="cpu").caption_images([path], method="beam", beam_size=2,
                                                                               max_length=5)
    assert again[0]["caption"] == results[0]["caption"]  # a checkpoint gives the same captions every time
    with pytest.raises(Exception, match="beam_sise"):
        captioner.caption_images([path], beam_sise=2)


def test_the_encoder_and_the_decoder_take_their_own_batch_sizes(tmp_path, checkpoint, monkeypatch):
    # the demo decodes a queue's requests together but runs its CNN on a few photos at a time
    from captioner import Captioner
    from captioner.decoding import captioner as captioning

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in range(7)]
    (tmp_path / "broken.jpg").write_text("not a JPEG")
    images.insert(3, tmp_path / "broken.jpg")
    captioner = Captioner.from_checkpoint(checkpoint, device="cpu")
    alone = [captioner.caption_images([image], batch_size=1, max_length=6)[0] for image in images]

    decode, encode = captioning.decode_features, captioning.encode_images
    decoded, encoded = [], []

    def decode_spy(model, rows, *args, **kwargs):
        decoded.append(len(rows))
        return decode(model, rows, *args, **kwargs)

    def encode_spy(*args, **kwargs):
        for indices, feats, bad in encode(*args, **kwargs):
            encoded.append(len(indices) + len(bad))
            yield indices, feats, bad

    monkeypatch.setattr(captioning, "decode_features", decode_spy)
    monkeypatch.setattr(captioning, "encode_images", encode_spy)
    together = captioner.caption_images(images, batch_size=4, encoder_batch_size=3, max_length=6)
    assert encoded == [3, 3, 2] and decoded == [4, 3]  # 8 inputs, one of them unreadable
    assert [r.get("caption") for r in together] == [r.get("caption") for r in alone]
    assert "caption" not in together[3] and together[3]["error"] == alone[3]["error"]
    assert [r.get("score", 0.0) for r in together] == pytest.approx([r.get("score", 0.0) for r in alone], rel=1e-4)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs chromium (apt-get install chromium)")
def test_gallery_renders_in_headless_chromium(tmp_path, checkpoint):
    from captioner.caption import caption_folder

    folder = make_folder(tmp_path)
    cfg = compose_config("caption", [f"folder={folder}", f"checkpoint={checkpoint}", "html=true", "progress=false",
                                     f"output={tmp_path / 'captions.json'}", "decode.max_length=4"])
    summary = caption_folder(cfg)
    assert summary["html"] == tmp_path / "captions.html" and sorted(summary["skipped"]) == sorted(BAD)
    dom = loaded_images(summary["html"], tmp_path)
    assert f'data-loaded="{len(GOOD)}/{len(GOOD)}"' in dom
    for c in summary["captions"]:
        assert c["file_name"] in dom


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs chromium (apt-get install chromium)")
def test_attention_gallery_and_strips_show_every_word_map(tmp_path):
    """An attention checkpoint: the page shows each caption word by word over the image, every
    thumbnail and map loads in Chromium, and attention=true writes one strip PNG per image."""
    from captioner.caption import CaptionError, caption_folder

    folder = make_folder(tmp_path)
    checkpoint = untrained_checkpoint(tmp_path / "att.pt", "model=show_attend_tell", "model.attention_dim=8")
    cfg = compose_config("caption", [f"folder={folder}", f"checkpoint={checkpoint}", "html=true", "attention=true",
                                     "progress=false", f"output={tmp_path / 'captions.json'}", "decode.max_length=4"])
    summary = caption_folder(cfg)
    words = [len(c["caption"].split()) + 1 for c in summary["captions"]]  # each word and <eos> has a map
    dom = loaded_images(summary["html"], tmp_path)
    total = len(GOOD) + sum(words)
    assert f'data-loaded="{total}/{total}"' in dom
    strips = sorted(p.name for p in summary["attention"].iterdir())
    assert strips == sorted(n.replace("/", "__") + ".png" for n in GOOD)
    with Image.open(summary["attention"] / "photo.bmp.png") as png:
        caption = next(c["caption"] for c in summary["captions"] if c["file_name"] == "photo.bmp")
        assert png.width == (len(caption.split()) + 2) * (112 + 4)  # the crop, each word, <eos>

    plain = compose_config("caption", [f"folder={folder}", f"checkpoint={untrained_checkpoint(tmp_path / 'st.pt')}",
                                       "attention=true", f"output={tmp_path / 'plain.json'}", "progress=false"])
    with pytest.raises(CaptionError, match="attention=true needs an attention checkpoint"):
        caption_folder(plain)
