"""Extraction's fast path (channels_last, torch.compile, bf16/fp16) gives the eager fp32 features."""
import copy
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.training import precision as precision_module
from captioner.data import ImageRecord
from captioner.encoding.encoders import build_encoder, fast_forward
from captioner.encoding.features import split_features
from captioner.training.precision import has_cxx_compiler, inference_dtype
from test_features import _light  # noqa: F401 (autouse: one thread per test)


@pytest.fixture
def photos(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    records = []
    for i in range(7):  # batches of 3: a short last batch
        path = folder / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (70 + i, 80, 3), dtype=np.uint8)).save(path)
        records.append(ImageRecord(i, str(path), [f"caption {i}"]))
    return records


def lite0(grid: bool = False):
    torch.manual_seed(0)
    return build_encoder("efficientnet_lite0", pretrained=False, input_size=64, grid=grid)


def relative_difference(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def nchw_reference(encoder):
    """The plain eager fp32 pipeline the fast path must agree with, built beside the encoder
    rather than through it: encoders are channels_last from construction, so their own forward
    is no NCHW reference. A copy of the network with its weights back in NCHW layout, fed
    contiguous NCHW input after the encoder's own normalization."""
    net = copy.deepcopy(encoder.net).to(memory_format=torch.contiguous_format)
    assert all(p.is_contiguous() for p in net.parameters())
    assert not all(p.is_contiguous() for p in encoder.net.parameters())  # the encoder's are channels_last

    def forward(images):
        x = encoder.normalize(images).contiguous()
        # Lite0's head map, regions in row-major order, or its pooled vector
        return net.feature_map(x).flatten(2).transpose(1, 2) if encoder.grid else net(x)

    return forward


@pytest.mark.parametrize("grid", [False, True])
def test_channels_last_gives_the_eager_features(grid):
    encoder = lite0(grid)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        plain = nchw_reference(encoder)(images)
        fast = fast_forward(encoder, "cpu", batch_size=4)(images)
    assert fast.shape == plain.shape and fast.dtype == torch.float32
    assert relative_difference(fast, plain) < 1e-5


def _cache(encoder, records, folder, **options):
    result = split_features(encoder, records, folder, "train", dtype="float32", batch_size=3, progress=False,
                            **options)
    manifest = json.loads((folder / f"{encoder.cache_name}_train.json").read_text())
    return np.array(result.features), manifest, result.computed


@pytest.mark.slow
@pytest.mark.skipif(not has_cxx_compiler(), reason="no C++ compiler: extraction would run eagerly, not compiled")
@pytest.mark.parametrize("grid", [False, True])
def test_a_compiled_extraction_agrees_with_an_eager_one(tmp_path, photos, grid, caplog):
    from torch._dynamo.utils import counters

    eager, _, _ = _cache(lite0(grid), photos, tmp_path / "eager", compile=False)
    counters.clear()
    with caplog.at_level(logging.WARNING, logger="captioner.encoding.encoders"):
        compiled, manifest, computed = _cache(lite0(grid), photos, tmp_path / "compiled", compile=True)
    # compiled, not the eager fallback: dynamo captured the encoder whole, once (the short last
    # batch padded to the full size, not a second graph), and nothing warned of falling back
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters)
    assert not [r for r in caplog.records if r.name == "captioner.encoding.encoders"]
    assert computed == len(photos) and compiled.shape == eager.shape  # the padded last batch trimmed
    assert relative_difference(compiled, eager) < 1e-5
    assert "precision" not in manifest  # fp32, compiled or not: the same cache


def test_without_a_compiler_extraction_warns_once_and_runs_eagerly(tmp_path, photos, monkeypatch, caplog):
    monkeypatch.setattr(precision_module, "has_cxx_compiler", lambda: False)
    eager, _, _ = _cache(lite0(), photos, tmp_path / "eager", compile=False)
    with caplog.at_level(logging.WARNING, logger="captioner.encoding.encoders"):
        fallback, _, _ = _cache(lite0(), photos, tmp_path / "fallback", compile=True)
    warnings = [r.getMessage() for r in caplog.records if r.name == "captioner.encoding.encoders"]
    assert len(warnings) == 1 and "C++ compiler" in warnings[0] and "encoder.compile=false" in warnings[0]
    np.testing.assert_array_equal(fallback, eager)


def test_reduced_precision_is_refused_in_one_line_where_the_cpu_lacks_it(monkeypatch):
    monkeypatch.setattr(precision_module, "_cpu_flags", lambda: {"avx2", "fma"})
    for name, needs in (("bf16", "avx512_bf16"), ("fp16", "amx_fp16")):
        with pytest.raises(ValueError) as err:
            inference_dtype(name, "cpu")
        message = str(err.value)
        assert "\n" not in message and f"encoder.precision={name}" in message and needs in message
        assert "encoder.precision=fp32" in message
    monkeypatch.setattr(precision_module, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert inference_dtype("bf16", "cpu") is torch.bfloat16 and inference_dtype("fp32", "cpu") is None


def _bf16_supported() -> bool:
    try:
        inference_dtype("bf16", "cpu")
        return True
    except ValueError:
        return False


@pytest.mark.skipif(not _bf16_supported(), reason="this CPU has neither AVX512-BF16 nor AMX")
def test_a_bf16_cache_is_recorded_and_never_mixed_with_the_fp32_one(tmp_path, photos):
    folder = tmp_path / "features"
    full, full_manifest, _ = _cache(lite0(), photos, folder, compile=False)
    half, manifest, computed = _cache(lite0(), photos, folder, compile=False, precision="bf16")
    assert manifest["precision"] == "bf16" and "precision" not in full_manifest
    assert computed == len(photos)  # not the fp32 cache reused
    # a bound, not a measurement (the benchmark saw 1.2e-2): bfloat16 rounds to 3.9e-3 relative,
    # and how those roundings add up depends on the weights, the images and the CPU's kernels
    assert 0 < relative_difference(half, full) < 5e-2
    again, _, computed = _cache(lite0(), photos, folder, compile=False)
    assert computed == len(photos)  # and the fp32 one recomputed, not the bf16 one taken
    np.testing.assert_allclose(again, full, rtol=1e-6, atol=1e-6)
