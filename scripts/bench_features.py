"""Feature-extraction throughput: the whole pipeline against the CNN alone.

    python scripts/bench_features.py [--encoders efficientnet_lite0 vgg16] [--workers 0 1 2]
    python scripts/bench.py features ...

pipeline: captioner.features.encode_images, the path extraction takes (JPEG decode + resize/crop
in DataLoader workers, normalise + CNN in the main process); model: the same CNN, same batch
size and threads, on images decoded beforehand. Goal: pipeline >= 85% of model. Random weights
(speed doesn't depend on them). Images: the shared Flickr8k JPEGs when present, else JPEGs
synthesised in a temporary folder. Model and pipeline runs alternate --repeats times; rates are
the best run (the one least disturbed by other work on a shared machine), the ratio the median of
the per-repeat ratios; the first batch of each run (worker start-up, warm-up) is not timed. The
CPU-time columns don't depend on other work: they give the ratio two dedicated cores would reach.
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
from captioner.features import encode_images  # noqa: E402
from captioner.images import load_image  # noqa: E402

FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k" / "images"
BATCH = {"vgg16": 16, "vgg19": 16}  # as conf/encoder/*.yaml
NUM_IMAGES = {"vgg16": 48, "vgg19": 48}  # VGG is ~20x slower: fewer images give as long a run


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


def model_rate(encoder, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(images/s, CPU ms per image: all threads, what the images cost whoever else runs)."""
    with torch.inference_mode():
        encoder(batches[0])  # warm-up
        start, cpu = time.perf_counter(), time.process_time()
        for x in batches[1:]:
            encoder(x)
    count = sum(len(x) for x in batches[1:])
    return count / (time.perf_counter() - start), (time.process_time() - cpu) * 1e3 / count


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
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads of the CNN")
    parser.add_argument("--num-images", type=int, default=96, help="per run (VGG: 48); the first batch is not timed")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the encoder's config (32, VGG 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=Path, default=FLICKR, help="a folder of JPEGs (default: shared Flickr8k)")
    parser.add_argument("--synthetic", action="store_true", help="synthesise 500x375 JPEGs instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        most = max(NUM_IMAGES.get(n, args.num_images) for n in args.encoders)
        all_paths, source = jpegs(None if args.synthetic else args.images, most, tmp)
        print(f"images: {source}; torch threads {args.threads}; {os.cpu_count()} CPUs; {args.repeats} repeats; "
              f"load average {os.getloadavg()[0]:.1f}")
        for name in args.encoders:
            torch.manual_seed(0)
            encoder = build_encoder(name, pretrained=False)
            batch_size = args.batch_size or BATCH.get(name, 32)
            paths = all_paths[: NUM_IMAGES.get(name, args.num_images)]
            normalize, to_uint8, decode_ms = encoder.normalize, encoder.crop, float("inf")
            for _ in range(args.repeats):  # what a worker does per image, in CPU time
                cpu = time.process_time()
                decoded = [to_uint8(load_image(p)) for p in paths]
                decode_ms = min(decode_ms, (time.process_time() - cpu) * 1e3 / len(paths))
            batches = list(normalize(torch.stack(decoded)).split(batch_size))
            models, model_ms, pipes = [], float("inf"), {w: [] for w in args.workers}
            for _ in range(args.repeats):  # interleaved, so a burst of other work hits both sides alike
                rate, ms = model_rate(encoder, batches)
                models.append(rate)
                model_ms = min(model_ms, ms)
                for w in args.workers:
                    pipes[w].append(pipeline_rate(encoder, paths, batch_size, w))
            for w in args.workers:
                ratio = float(np.median([p / m for p, m in zip(pipes[w], models)]))
                rows.append({"encoder": name, "batch_size": batch_size, "workers": w, "threads": args.threads,
                             "images": len(paths), "model_img_s": round(max(models), 2),
                             "pipeline_img_s": round(max(pipes[w]), 2), "ratio": round(ratio, 3),
                             "decode_cpu_ms": round(decode_ms, 2), "model_cpu_ms": round(model_ms, 1),
                             "cpu_bound": round(model_ms / (model_ms + decode_ms), 3)})
    print(f"{'encoder':<19}{'batch':>6}{'workers':>8}{'threads':>8}{'model img/s':>12}{'pipeline img/s':>15}{'ratio':>6}"
          f"{'decode CPU ms':>14}{'model CPU ms':>13}{'CPU bound':>10}")
    for r in rows:
        print(f"{r['encoder']:<19}{r['batch_size']:>6}{r['workers']:>8}{r['threads']:>8}{r['model_img_s']:>12.1f}"
              f"{r['pipeline_img_s']:>15.1f}{r['ratio']:>6.0%}{r['decode_cpu_ms']:>14.2f}{r['model_cpu_ms']:>13.1f}"
              f"{r['cpu_bound']:>10.0%}")
    print(f"load average now {os.getloadavg()[0]:.1f} (other processes competing for the CPUs lower both figures).")
    print("img/s: best run; ratio: pipeline / model, wall clock, median over the interleaved runs. CPU bound: model / (model + decode) CPU per image, the ratio "
          "when decoding takes cores from the CNN but nothing else does.")
    return rows


if __name__ == "__main__":
    run()
