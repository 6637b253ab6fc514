"""Feature-extraction throughput: captioner's extraction against a plain eager fp32 pipeline.

    python scripts/bench_features.py [--encoders efficientnet_lite0 vgg16] [--repeats 3]
    python scripts/bench.py features ...

Every row is the whole pipeline (JPEG decode and resize/crop in DataLoader workers, normalise and
CNN in the main process) over the same images, measured side by side in one process:

- ``eager fp32`` (the reference, written here): a copy of the encoder's network with its weights
  converted back to the plain NCHW layout (encoders are channels_last from construction, so the
  encoder's own forward is no such reference), no autocast, no compilation, fed the encoder's
  normalized batches of the same DataLoader as contiguous NCHW tensors.
- ``channels_last``: ``captioner.encoding.features.encode_images`` eager (``encoder.compile=false``).
- ``default``: ``encode_images`` with the extraction defaults (channels_last, ``torch.compile``,
  fp32, ``encoder.num_workers`` and batch size of the config).
- ``bf16``: the default with ``encoder.precision=bf16``, where this CPU (AVX512-BF16 or AMX) or
  GPU supports it.

"model" is the same forward on images decoded beforehand: pipeline / model near 100% means
decoding does not starve the CNN. Differences are the max |f - f_ref| / max |f_ref| over the
features of every image against the eager fp32 reference. Random weights (speed does not depend
on them); EfficientNet-Lite0 at 288 pixels (experiment=flickr8k), VGG16 at 224. Rates are the
best of ``--repeats`` runs, variants interleaved; the first batch of each run (worker start-up,
warm-up) is not timed, and compiling happens once before timing (its seconds are shown).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from captioner.encoding.encoders import build_encoder, fast_forward  # noqa: E402
from captioner.encoding.features import ImageFiles, collate, default_workers, encode_images  # noqa: E402
from captioner.data.images import load_image  # noqa: E402
from captioner.training.precision import inference_dtype  # noqa: E402

FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k" / "images"
SIZE = {"efficientnet_lite0": (288, 1.0)}  # (input_size, crop_pct) as experiment=flickr8k; others standard
BATCH = {"vgg16": 16, "vgg19": 16}  # as conf/encoder/*.yaml
NUM_IMAGES = {"vgg16": 64, "vgg19": 64}  # VGG is ~5x slower: fewer images give as long a run


def jpegs(folder: Path | None, count: int, tmp: str, size=(500, 375)) -> tuple[list[str], str]:
    if folder is not None and folder.is_dir():
        paths = sorted(str(p) for p in folder.glob("*.jpg"))[:count]
        if len(paths) == count:
            return paths, str(folder)
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):  # smooth noise upsampled: compresses like a photo, unlike white noise
        small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        path = os.path.join(tmp, f"{i:05d}.jpg")
        Image.fromarray(small).resize(size, Image.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths, f"{count} synthetic {size[0]}x{size[1]} JPEGs"


def nchw_forward(encoder, device: torch.device):
    """The reference's forward of a uint8 batch: the encoder's normalization, then a copy of its
    network (pooled: these encoders have no grid) with the weights back in NCHW, on NCHW input.
    Both must be NCHW: one channels_last weight is enough for oneDNN to run a convolution
    channels_last."""
    net = copy.deepcopy(encoder.net).to(device, memory_format=torch.contiguous_format)
    return lambda images: net(encoder.normalize(images.to(device)).contiguous())


def eager_pipeline(encoder, forward, paths, batch_size: int, workers: int):
    """The reference pipeline: the encoder's crop in the same DataLoader, then ``forward``."""
    loader = DataLoader(ImageFiles(paths, encoder.crop), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate)
    for indices, images, _ in loader:
        with torch.inference_mode():
            yield indices, forward(images), []


def timed_pipeline(batches) -> tuple[float, np.ndarray]:
    """(images/s after the first batch, every image's features)."""
    count, start, feats = 0, None, []
    for indices, out, _ in batches:
        feats.append(out.float().numpy())
        if start is None:
            start = time.perf_counter()
        else:
            count += len(indices)
    return count / (time.perf_counter() - start), np.concatenate(feats)


def model_rate(forward, batches: list[torch.Tensor]) -> float:
    def sync():
        if batches[0].is_cuda:
            torch.cuda.synchronize()

    with torch.inference_mode():
        forward(batches[0])
        sync()
        start = time.perf_counter()
        for x in batches[1:]:
            forward(x)
        sync()
    return sum(len(x) for x in batches[1:]) / (time.perf_counter() - start)


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def run(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=["efficientnet_lite0", "vgg16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads of the CNN")
    parser.add_argument("--num-images", type=int, default=160, help="per run (VGG: 64); the first batch is not timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=Path, default=FLICKR, help="a folder of JPEGs (default: shared Flickr8k)")
    parser.add_argument("--synthetic", action="store_true", help="synthesise 500x375 JPEGs instead")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    workers = default_workers()
    try:
        inference_dtype("bf16", device)
        precisions = ["fp32", "bf16"]
    except ValueError as err:
        precisions = ["fp32"]
        print(f"no bf16 rows: {err}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        most = max(NUM_IMAGES.get(n, args.num_images) for n in args.encoders)
        all_paths, source = jpegs(None if args.synthetic else args.images, most, tmp)
        print(f"images: {source}; torch threads {args.threads}; {os.cpu_count()} CPUs; DataLoader workers "
              f"{workers} (the default); {args.repeats} repeats; load average {os.getloadavg()[0]:.1f}")
        for name in args.encoders:
            size, pct = SIZE.get(name, (None, None))
            torch.manual_seed(0)
            encoder = build_encoder(name, pretrained=False, input_size=size, crop_pct=pct).to(device)
            reference = nchw_forward(encoder, device)
            batch_size = BATCH.get(name, 32)
            paths = all_paths[: NUM_IMAGES.get(name, args.num_images)]
            decoded = torch.stack([encoder.crop(load_image(p)) for p in paths]).to(device)
            batches = list(decoded.split(batch_size))
            variants = {"eager fp32": None, "channels_last": ("fp32", False),
                        **{("default" if p == "fp32" else p): (p, True) for p in precisions}}
            forwards, warmup = {}, {}
            for label, options in variants.items():
                if options is None:
                    forwards[label] = reference
                    warmup[label] = 0.0
                    continue
                forward = fast_forward(encoder, device, batch_size, *options)
                start = time.perf_counter()
                with torch.inference_mode():  # compiles here, not in a timed run
                    forward(batches[0])
                    forward(batches[-1])
                warmup[label] = time.perf_counter() - start
                forwards[label] = forward
            rates = {label: [] for label in variants}
            models = {label: [] for label in variants}
            feats = {}
            for _ in range(args.repeats):
                for label, options in variants.items():
                    if options is None:
                        rate, out = timed_pipeline(eager_pipeline(encoder, reference, paths, batch_size, workers))
                    else:
                        precision, compiled = options
                        rate, out = timed_pipeline(encode_images(encoder, paths, batch_size, workers, device,
                                                                 precision=precision, compile=compiled))
                    rates[label].append(rate)
                    models[label].append(model_rate(forwards[label], batches))
                    feats[label] = out
            base = max(rates["eager fp32"])
            for label in variants:
                rows.append({"encoder": name, "input": encoder.transform_spec()["crop"], "variant": label,
                             "batch_size": batch_size, "pipeline_img_s": round(max(rates[label]), 2),
                             "model_img_s": round(max(models[label]), 2),
                             "speedup": round(max(rates[label]) / base, 2),
                             "max_rel_diff": relative_difference(feats[label], feats["eager fp32"]),
                             "warmup_s": round(warmup[label], 1)})
    print(f"{'encoder':<19}{'px':>4}{'variant':>15}{'batch':>6}{'pipeline img/s':>15}{'model img/s':>12}"
          f"{'vs eager':>9}{'max rel diff':>13}{'compile s':>10}")
    for r in rows:
        print(f"{r['encoder']:<19}{r['input']:>4}{r['variant']:>15}{r['batch_size']:>6}{r['pipeline_img_s']:>15.1f}"
              f"{r['model_img_s']:>12.1f}{r['speedup']:>8.2f}x{r['max_rel_diff']:>13.1e}{r['warmup_s']:>10.1f}")
    for name in args.encoders:
        default = next(r for r in rows if r["encoder"] == name and r["variant"] == "default")
        print(f"{name}: speed-up over eager fp32: {default['speedup']:.1f}x "
              f"(features max relative difference {default['max_rel_diff']:.1e})")
    print(f"load average now {os.getloadavg()[0]:.1f} (other processes competing for the CPUs lower every figure).")
    return rows


if __name__ == "__main__":
    run()
