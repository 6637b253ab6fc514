"""Benchmarks, each measured side by side in one process (these machines are shared and noisy).

    python scripts/bench.py              # every benchmark, one table each
    python scripts/bench.py decode       # greedy vs batched beam vs per-image beam
    python scripts/bench.py features     # pipeline vs model-only images/s
    python scripts/bench.py memory       # peak RSS training from a COCO-size memory-mapped cache
    python scripts/bench.py train        # training step efficiency vs plain matmul GFLOP/s
    python scripts/bench.py reward       # CIDEr-D reward: CiderD.score vs pycocoevalcap captions/s
    python scripts/bench.py scst         # one SCST step vs one cross-entropy step over as many captions
    python scripts/bench.py demo         # the live demo: 200 requests from 20 concurrent clients vs one at a time
    python scripts/bench.py significance # 1,000 paired resamples of 5,000 images vs the toolkit per resample
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
BENCHMARKS = {"features": "bench_features", "memory": "bench_memory", "train": "bench_train", "decode": "bench_decode",
              "reward": "bench_reward", "scst": "bench_scst", "significance": "bench_significance",
              "demo": "bench_demo"}


def machine() -> str:
    from bench_train import cpu_name

    cpu = f"{cpu_name()} ({os.cpu_count()} cores)"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}"


def main(argv: list[str]) -> None:
    names = argv[:1] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark {unknown[0]!r}: choose from {', '.join(BENCHMARKS)}")
    print(f"machine: {machine()}")
    for name in names:
        print(f"\n== {name} ==")
        importlib.import_module(BENCHMARKS[name]).run(argv[1:] if argv[:1] else [])


if __name__ == "__main__":
    main(sys.argv[1:])
