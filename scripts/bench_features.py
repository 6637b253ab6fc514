"""Feature-extraction throughput: the whole pipeline against the CNN alone.

    python scripts/bench_features.py [--encoders efficientnet_lite0 vgg16] [--workers 0 1 2]
    python scripts/bench.py features ...

pipeline: captioner.features.encode_images, the path extraction takes (JPEG decode + resize/crop
in DataLoader workers, normalise + CNN in the main process); model: the same CNN, same batch
size and threads, on images decoded beforehand. Goal: pipeline >= 85% of model. Random weights
(speed doesn't depend on them). Images: the shared Flickr8k JPEGs when present, else JPEGs
synthesised in a temporary folder. Each figure is the best of --repeats runs, model and
pipeline interleaved, excluding the first batch (worker start-up, warm-up): on a shared machine
the best run is the one least disturbed by other work.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from captioner.encoders import build_encoder  # noqa: E402
from captioner.features import Normalize, encode_images, uint8_transform  # noqa: E402
from captioner.images import load_image  # noqa: E402

FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k" / "images"
BATCH = {"vgg16": 16, "vgg19": 16}  # as conf/encoder/*.yaml
NUM_IMAGES = {"vgg16": 64, "vgg19": 64}  # VGG is ~20x slower: fewer images give as long a run


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


def model_rate(encoder, batches: list[torch.Tensor]) -> float:
    with torch.inference_mode():
        encoder(batches[0])  # warm-up
        start = time.perf_counter()
        for x in batches[1:]:
            encoder(x)
    return sum(len(x) for x in batches[1:]) / (time.perf_counter() - start)


def pipeline_rate(encoder, paths: list[str], batch_size: int, workers: int) -> float:
    count, start = 0, None
    for indices, _, _ in encode_images(encoder, paths, batch_size, workers):
        if start is None:
            start = time.perf_counter()
        else:
            count += len(indices)
    return count / (time.perf_counter() - start)


def run(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=["efficientnet_lite0", "vgg16"])
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads of the CNN")
    parser.add_argument("--num-images", type=int, default=256, help="per run (VGG: 64)")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the encoder's config (32, VGG 16)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--images", type=Path, default=FLICKR, help="a folder of JPEGs (default: shared Flickr8k)")
    parser.add_argument("--synthetic", action="store_true", help="synthesise 500x375 JPEGs instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        most = max(NUM_IMAGES.get(n, args.num_images) for n in args.encoders)
        all_paths, source = jpegs(None if args.synthetic else args.images, most, tmp)
        print(f"images: {source}; torch threads {args.threads}; {os.cpu_count()} CPUs; best of {args.repeats}")
        for name in args.encoders:
            torch.manual_seed(0)
            encoder = build_encoder(name, pretrained=False)
            batch_size = args.batch_size or BATCH.get(name, 32)
            paths = all_paths[: NUM_IMAGES.get(name, args.num_images)]
            spec, normalize = encoder.transform_spec(), Normalize(encoder.transform_spec())
            to_uint8 = uint8_transform(spec)
            decoded = torch.stack([normalize(to_uint8(load_image(p))[None])[0] for p in paths])
            batches = list(decoded.split(batch_size))
            model, pipe = {}, {w: 0.0 for w in args.workers}
            model = 0.0
            for _ in range(args.repeats):
                model = max(model, model_rate(encoder, batches))
                for w in args.workers:
                    pipe[w] = max(pipe[w], pipeline_rate(encoder, paths, batch_size, w))
            for w in args.workers:
                rows.append({"encoder": name, "batch_size": batch_size, "workers": w, "threads": args.threads,
                             "images": len(paths), "model_img_s": round(model, 2),
                             "pipeline_img_s": round(pipe[w], 2), "ratio": round(pipe[w] / model, 3)})
    print(f"{'encoder':<20}{'batch':>6}{'workers':>8}{'threads':>8}{'model img/s':>13}{'pipeline img/s':>16}{'ratio':>7}")
    for r in rows:
        print(f"{r['encoder']:<20}{r['batch_size']:>6}{r['workers']:>8}{r['threads']:>8}{r['model_img_s']:>13.1f}"
              f"{r['pipeline_img_s']:>16.1f}{r['ratio']:>7.0%}")
    return rows


if __name__ == "__main__":
    run()
