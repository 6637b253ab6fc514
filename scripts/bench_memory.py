"""Peak memory while training from a COCO-size feature cache: memory-mapped, never loaded.

    python scripts/bench_memory.py [--images 123287] [--dim 4096] [--steps 100]
    python scripts/bench_memory.py --regions 49 --dim 1280 --images 10000   # a grid cache, attention decoder
    python scripts/bench.py memory ...

Writes a cache the size of COCO's (123,287 images x 4096 float16, 1.0 GB) into a temporary
folder, then, in a fresh process (peak RSS is per process), trains the default decoder for
--steps steps on batches drawn by captioner.training.engine.CaptionBatches from it (5 captions per image,
like COCO), then reads one whole epoch of batches with the same access pattern. It reports peak
RSS and what the RSS is made of: anonymous memory (the process's own: model, optimizer, tokens,
batches) and file pages (cache pages touched through the map: page cache, shared and dropped
under memory pressure, not a copy). The cache file is deleted afterwards.

With ``--regions R`` the cache holds grids ([images, R, dim], what ``model.name=show_attend_tell``
trains from) and the decoder is the attention one; the line ``COCO-size grid cache`` states what
the full cache would take (123,287 x 49 x 1280 float16 is 15.5 GB), measured on --images of it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
MB = 2**20


def write_cache(path: Path, shape: tuple[int, ...]) -> None:
    """A filled cache without holding it in memory: the header through numpy, rows by pwrite."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)  # sparse until written
    offset = array.offset
    del array
    block = np.random.default_rng(0).standard_normal((1 << 22,), dtype=np.float32).astype(np.float16).tobytes()
    fd = os.open(path, os.O_WRONLY)
    try:
        total = int(np.prod(shape)) * 2
        for start in range(0, total, len(block)):
            os.pwrite(fd, block[: total - start], offset + start)
    finally:
        os.close(fd)


def memory() -> dict:
    """Current and peak RSS of this process, and the current anonymous / file-backed split (MB)."""
    import resource

    status = {}
    if os.path.exists("/proc/self/status"):
        for line in open("/proc/self/status"):
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                status[key] = int(value.split()[0]) / 1024
    # VmHWM is this process's own high-water mark; ru_maxrss survives exec, so a child started
    # by a process that ran bigger benchmarks would report the parent's peak.
    peak = status.get("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rss": status.get("VmRSS"), "peak": peak, "anon": status.get("RssAnon"), "file": status.get("RssFile")}


def child(args) -> list[dict]:
    import itertools

    import torch
    from omegaconf import OmegaConf

    from captioner.models.show_attend_tell import ShowAttendTellConfig
    from captioner.models.show_tell import ShowTellConfig
    from captioner.data import ImageRecord
    from captioner.data.batches import CaptionBatches
    from captioner.training.engine import train_one_epoch
    from captioner.encoding.features import open_cache
    from captioner.models import build_model
    from captioner.data.vocab import SPECIALS, Vocabulary

    torch.manual_seed(0)
    clock = time.perf_counter()
    phases = []

    def phase(name: str) -> None:
        nonlocal clock
        phases.append({"phase": name, **memory(), "seconds": round(time.perf_counter() - clock, 1)})
        clock = time.perf_counter()

    class IdVocabulary(Vocabulary):  # captions are written as word ids: skips the (exact, slow) PTB tokenizer
        def encode(self, caption, max_length=None):
            return [self.bos_id, *map(int, caption.split()[:max_length]), self.eos_id]

    phase("imports (torch, captioner)")
    features = open_cache(args.cache)  # as training gets it from captioner.encoding.features
    vocab = IdVocabulary([*SPECIALS, *(f"w{i}" for i in range(args.vocab - len(SPECIALS)))])
    ids = np.random.default_rng(0).integers(len(SPECIALS), len(vocab), (len(features), 5, 10))
    records = [ImageRecord(i, f"{i}.jpg", [" ".join(map(str, caption)) for caption in ids[i].tolist()])
               for i in range(len(features))]  # COCO-like: 5 captions of 10 words per image
    del ids
    batches = CaptionBatches(features, records, vocab, max_length=16, batch_size=args.batch_size)
    schema = ShowAttendTellConfig if features.ndim == 3 else ShowTellConfig
    model = build_model(OmegaConf.structured(schema), len(vocab), features.shape[-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    phase(f"records, CaptionBatches ({len(batches.rows)} pairs), model")

    train_one_epoch(model, optimizer, None, itertools.islice(batches.epoch(0), args.steps), "cpu", 5.0)
    phase(f"{args.steps} training steps of batch {args.batch_size}")

    for _ in batches.epoch(1):  # the access pattern alone, without the model
        pass
    phase(f"+ a whole epoch of batch reads ({len(batches)} batches)")
    return phases


def run(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=123_287)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--regions", type=int, default=0, help="> 0: a grid cache [images, regions, dim]")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=2000, help="words (the output layer sets step time, not memory)")
    parser.add_argument("--dir", default=None, help="where to write the temporary cache (default: the temp dir)")
    parser.add_argument("--cache", help=argparse.SUPPRESS)  # set in the measuring child process
    args = parser.parse_args(argv)
    if args.cache:
        print(json.dumps(child(args)))
        return []

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        cache = Path(tmp) / "features.npy"
        start = time.perf_counter()
        shape = (args.images, args.regions, args.dim) if args.regions else (args.images, args.dim)
        if args.regions:
            full = 123_287 * args.regions * args.dim * 2
            print(f"COCO-size grid cache: 123,287 x {args.regions} x {args.dim} float16 = {full / 1e9:.1f} GB "
                  f"({full / 2**30:.1f} GiB) on disk; measured here on {args.images} images of the same layout")
        write_cache(cache, shape)
        size = cache.stat().st_size / MB
        print(f"cache: {' x '.join(map(str, shape))} float16 = {size:.0f} MB, written in "
              f"{time.perf_counter() - start:.1f}s")
        with open(cache, "rb") as f:  # start cold, as a cache on disk does: out of the page cache
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        argv_child = [sys.executable, __file__, "--cache", str(cache), *(sys.argv[1:] if argv is None else argv)]
        out = subprocess.run(argv_child, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"the measuring process failed:\n{out.stderr[-3000:]}")
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'after':<52}{'RSS MB':>8}{'peak MB':>9}{'anon MB':>9}{'file MB':>9}{'peak/cache':>12}{'s':>6}")
    for r in rows:
        r["cache_mb"] = round(size)
        print(f"{r['phase']:<52}{r['rss']:>8.0f}{r['peak']:>9.0f}{r['anon']:>9.0f}{r['file']:>9.0f}"
              f"{r['peak'] / size:>12.0%}{r['seconds']:>6.1f}")
    setup, steps, epoch = rows[1], rows[2], rows[3]
    print(f"training read the cache through the map: +{steps['file'] - setup['file']:.0f} MB of mapped file pages over "
          f"{args.steps} steps, +{epoch['file'] - setup['file']:.0f} MB after an epoch (every row read), against "
          f"a {size:.0f} MB cache; anonymous memory, which loading the cache would grow by {size:.0f} MB "
          f"({2 * size:.0f} MB as float32), grew {epoch['anon'] - setup['anon']:+.0f} MB (model, optimizer, "
          f"batches). Mapped file pages are page cache: shared, and dropped by the kernel under memory pressure.")
    return rows


if __name__ == "__main__":
    run()
