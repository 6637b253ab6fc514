import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from captioner.data import ImageRecord
from captioner.encoding.encoders import _IMAGENET_SPEC, _LITE0_SPEC, ENCODER_DIMS, Encoder
from captioner.extract import extract
from captioner.encoding.features import split_features
from captioner.data.images import BadImageError

from conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]
TINY_SPEC = {"resize": 20, "crop": 16, "interpolation": "bilinear", "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}


class CountingNet(nn.Module):
    """A small CNN that counts the images it encodes and can fail after some batches."""

    def __init__(self, fail_after: int = -1):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.images, self.batches, self.fail_after = 0, 0, fail_after

    def forward(self, x):
        if self.batches == self.fail_after:
            raise RuntimeError("simulated crash")
        self.images += len(x)
        self.batches += 1
        return torch.relu(self.conv(x)).mean((2, 3))


def tiny_encoder(seed: int = 0, fail_after: int = -1) -> Encoder:
    torch.manual_seed(seed)
    return Encoder("tiny", CountingNet(fail_after), 6, TINY_SPEC)


@pytest.fixture(autouse=True)
def _light():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    records = []
    for i in range(10):
        path = folder / f"img{i}.{'png' if i % 3 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (24 + i, 30, 3), dtype=np.uint8)).save(path)
        records.append(ImageRecord(i, str(path), [f"caption {i}"]))
    return records


def reference(encoder, records):
    """Features through Encoder.transform, one image at a time (not counted as encoded)."""
    count = encoder.net.images
    with torch.no_grad():
        out = encoder(torch.stack([encoder.transform(Image.open(r.path)) for r in records])).numpy()
    encoder.net.images = count
    return out


@pytest.mark.parametrize("spec", [_LITE0_SPEC, _IMAGENET_SPEC])
def test_worker_uint8_path_is_bit_identical_to_torchvisions_float_pipeline(spec):
    """crop in the workers + normalize on the device == torchvision's Resize, CenterCrop,
    ToTensor, Normalize on one image, to the bit."""
    from torchvision import transforms as T

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 200, 3), dtype=np.uint8))
    encoder = Encoder("x", nn.Identity(), 3, spec)
    reference = T.Compose([T.Resize(spec["resize"], interpolation=T.InterpolationMode(spec["interpolation"])),
                           T.CenterCrop(spec["crop"]), T.ToTensor(), T.Normalize(spec["mean"], spec["std"])])
    assert torch.equal(encoder.normalize(encoder.crop(image)[None])[0], reference(image))
    assert torch.equal(encoder.transform(image), reference(image))


def test_cache_is_reused_and_invalidated(tmp_path, images):
    encoder, cache = tiny_encoder(), tmp_path / "cache"
    first = split_features(encoder, images, cache, "train", batch_size=4, progress=False)
    assert first.computed == encoder.net.images == 10 and first.features.shape == (10, 6)
    assert isinstance(first.features, np.memmap) and first.features.dtype == np.float16
    np.testing.assert_allclose(first.features, reference(encoder, images), rtol=2e-3, atol=1e-4)
    manifest = json.loads((cache / "tiny_train.json").read_text())
    assert manifest["dtype"] == "float16" and manifest["feature_dim"] == 6 and manifest["skipped"] == []

    again = split_features(encoder, images, cache, "train", batch_size=4, progress=False)
    assert again.computed == 0 and encoder.net.images == 10
    assert np.array_equal(again.features, first.features)
    assert np.array_equal(split_features(encoder, images, cache, "train", progress=False).features, first.features)

    with torch.no_grad():
        encoder.net.conv.bias.add_(1e-3)  # changed weights
    assert split_features(encoder, images, cache, "train", progress=False).computed == 10
    assert split_features(encoder, images[:-1], cache, "train", progress=False).computed == 9  # image list
    f32 = split_features(encoder, images[:-1], cache, "train", dtype="float32", progress=False)  # dtype
    assert f32.computed == 9 and f32.features.dtype == np.float32
    assert encoder.net.images == 10 + 10 + 9 + 9
    assert sorted(p.name for p in cache.iterdir()) == [".tiny_train.lock", "tiny_train.json", "tiny_train.npy"]


def test_interrupted_extraction_resumes_where_it_stopped(tmp_path, images):
    whole = split_features(tiny_encoder(), images, tmp_path / "whole", "val", batch_size=3, progress=False)

    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="simulated crash"):
        split_features(tiny_encoder(fail_after=2), images, cache, "val", batch_size=3, progress=False)
    assert not (cache / "tiny_val.npy").exists() and (cache / "tiny_val.partial.npy").exists()
    assert json.loads((cache / "tiny_val.partial.0-10.json").read_text())["done"] == 6

    encoder = tiny_encoder()
    resumed = split_features(encoder, images, cache, "val", batch_size=3, progress=False)
    assert resumed.computed == encoder.net.images == 4
    assert np.array_equal(resumed.features, whole.features)
    assert sorted(p.name for p in cache.iterdir()) == [".tiny_val.lock", "tiny_val.json", "tiny_val.npy"]


def test_a_different_manifest_discards_the_partial_extraction(tmp_path, images):
    with pytest.raises(RuntimeError):
        split_features(tiny_encoder(fail_after=1), images, tmp_path, "val", batch_size=4, progress=False)
    other = tiny_encoder(seed=1)  # other weights
    assert split_features(other, images, tmp_path, "val", batch_size=4, progress=False).computed == 10
    np.testing.assert_allclose(np.load(tmp_path / "tiny_val.npy"), reference(other, images), rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_unreadable_images_are_named_then_fatal_or_skipped(tmp_path, images, num_workers):
    Path(images[4].path).write_bytes(b"not an image at all")
    Path(images[7].path).write_bytes(Path(images[6].path).read_bytes()[:60])  # truncated
    cache, opts = tmp_path / "cache", {"batch_size": 4, "num_workers": num_workers, "progress": False}
    with pytest.raises(BadImageError) as err:
        split_features(tiny_encoder(), images, cache, "train", **opts)
    message = str(err.value)
    assert "2 unreadable image(s) in split 'train'" in message and "data.on_bad_image=skip" in message
    assert images[4].path in message and images[7].path in message

    encoder = tiny_encoder()
    kept = split_features(encoder, images, cache, "train", on_bad_image="skip", **opts)
    assert encoder.net.images == 0  # the error run's pass is finished, not recomputed
    good = [r for i, r in enumerate(images) if i not in (4, 7)]
    assert kept.records == good and [s["index"] for s in kept.skipped] == [4, 7]
    np.testing.assert_allclose(kept.features, reference(encoder, good), rtol=2e-3, atol=1e-4)

    with pytest.raises(BadImageError, match="img4"):  # a cache with skipped images is still an error here
        split_features(encoder, images, cache, "train", **opts)
    assert split_features(encoder, images, cache, "train", on_bad_image="skip", **opts).records == good


def test_every_encoder_config_composes():
    for yaml in sorted((ROOT / "conf" / "encoder").glob("*.yaml")):
        cfg = compose_config("train", [f"encoder={yaml.stem}"])
        assert cfg.encoder.name == yaml.stem and cfg.encoder.name in ENCODER_DIMS


def test_extract_cli_on_tiny_shapes(tmp_path, capsys):
    overrides = [f"data.root={tmp_path / 'shapes'}", "data.num_train=8", "data.num_val=4", "data.num_test=4",
                 "data.image_size=32", "encoder.pretrained=false", "encoder.batch_size=8", "encoder.compile=false",
                 "train.device=cpu", "train.progress=false"]
    args = [sys.executable, "-m", "captioner.extract", *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert first.returncode == 0, first.stderr[-3000:]
    assert "train: 8 images x 1280 float16 (computed 8 in" in first.stdout
    assert "efficientnet_lite0: 16 images in" in first.stdout and "images/s" in first.stdout
    features = tmp_path / "shapes" / "features"
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        assert np.load(features / f"efficientnet_lite0_{split}.npy", mmap_mode="r").shape == (n, 1280)
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()

    again = extract(compose_config("train", overrides))  # seeded random weights: the same cache
    assert [r.computed for r in again.values()] == [0, 0, 0]
    assert capsys.readouterr().out.count("(cached)") == 3


def test_extraction_leaves_the_global_rng_alone(tmp_path, images):
    encoder = tiny_encoder()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    split_features(encoder, images, tmp_path, "train", batch_size=4, progress=False)
    assert torch.equal(torch.rand(3), expected)  # training draws the same model init and batch order


def test_another_image_size_gets_its_own_cache_beside_the_standard_one(tmp_path, images):
    from captioner.encoding.encoders import sized_spec

    cache = tmp_path / "cache"
    standard = split_features(tiny_encoder(), images, cache, "train", progress=False).features
    torch.manual_seed(0)
    larger = Encoder("tiny", CountingNet(), 6, sized_spec(TINY_SPEC, TINY_SPEC["crop"] * 2, 1.0), standard=False)
    resized = split_features(larger, images, cache, "train", progress=False).features
    assert sorted(p.name for p in cache.glob("*.npy")) == [f"tiny_r{TINY_SPEC['crop'] * 2}c{TINY_SPEC['crop'] * 2}_train.npy",
                                                          "tiny_train.npy"]
    assert not np.array_equal(np.asarray(standard), np.asarray(resized))
    again = tiny_encoder()  # the standard cache is still there, and reused
    np.testing.assert_array_equal(split_features(again, images, cache, "train", progress=False).features, standard)
    assert again.net.batches == 0


class CountingGridNet(CountingNet):
    def feature_map(self, x):
        self.images += len(x)
        return torch.relu(self.conv(x))


def test_grid_cache_is_reused_and_invalidated(tmp_path, images):
    """A grid encoder's cache: [images, regions, channels] under its own name, beside the pooled one."""
    torch.manual_seed(0)
    net = CountingGridNet()
    encoder = Encoder("tiny", net, 6, TINY_SPEC, trunk=lambda n, x: n.feature_map(x))
    assert encoder.feature_shape == (49, 6)  # 16 pixels, 3x3 conv with stride 2
    cache = tmp_path / "cache"
    first = split_features(encoder, images, cache, "train", batch_size=4, progress=False)
    assert first.features.shape == (10, 49, 6) and first.computed == 10
    with torch.no_grad():
        expected = torch.stack([encoder.transform(Image.open(r.path)) for r in images])
        expected = encoder(expected).numpy()
    np.testing.assert_allclose(first.features, expected, rtol=2e-3, atol=1e-4)
    manifest = json.loads((cache / "tiny_grid_train.json").read_text())
    assert manifest["regions"] == 49 and manifest["feature_dim"] == 6

    encoder.net.images = 0
    assert split_features(encoder, images, cache, "train", progress=False).computed == 0
    pooled = Encoder("tiny", net, 6, TINY_SPEC)  # the pooled cache is another file, not this one
    assert split_features(pooled, images, cache, "train", progress=False).features.shape == (10, 6)
    with torch.no_grad():
        net.conv.bias.add_(1e-3)
    assert split_features(encoder, images, cache, "train", progress=False).computed == 10
    assert {p.name for p in cache.glob("*.npy")} == {"tiny_train.npy", "tiny_grid_train.npy"}


def test_a_pooled_cache_that_is_the_grid_mean_comes_from_the_grid_cache(tmp_path, images):
    """ResNet and Lite0 pool by averaging their grid: with the grid cached, the pooled cache is its
    mean over the regions, written without a CNN pass, within float16 rounding of a direct one."""
    torch.manual_seed(0)
    net = CountingGridNet()
    grid = Encoder("tiny", net, 6, TINY_SPEC, trunk=lambda n, x: n.feature_map(x), pooled_is_grid_mean=True)
    pooled = Encoder("tiny", net, 6, TINY_SPEC, pooled_is_grid_mean=True)
    split_features(grid, images, tmp_path / "cache", "val", batch_size=4, progress=False)
    net.images = 0
    derived = split_features(pooled, images, tmp_path / "cache", "val", progress=False)
    assert net.images == 0 and derived.computed == 0 and derived.features.shape == (10, 6)
    manifest = json.loads((tmp_path / "cache" / "tiny_val.json").read_text())
    assert manifest["derived_from"] == "tiny_grid_val.npy"
    direct = split_features(pooled, images, tmp_path / "direct", "val", progress=False)
    assert direct.computed == 10
    np.testing.assert_allclose(derived.features.astype(np.float32), direct.features.astype(np.float32),
                               rtol=2e-3, atol=1e-3)
    assert split_features(pooled, images, tmp_path / "cache", "val", progress=False).computed == 0  # reused
