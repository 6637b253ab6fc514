"""The short table scripts/gpu_check.sh prints last, read from the files of its stages.

    python scripts/gpu_summary.py OUT_DIR

A figure whose stage did not run or did not finish reads "not run" (see that stage's file).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path


def read(out: Path, name: str) -> str:
    path = out / name
    return path.read_text(errors="replace") if path.is_file() else ""


def matches(text: str, pattern: str) -> list[re.Match]:
    """The lines of ``text`` that start with ``pattern``, as matches."""
    return [m for m in map(re.compile(pattern).match, text.splitlines()) if m]


def training_rows(text: str) -> list[str]:
    """Each precision's COCO-size step: 'mixed 8-16 | <variant>  s/step median tokens tok/s GFLOP GFLOP/s %matmul'."""
    step = r"mixed 8-16 \| (.+?)\s{2,}([\d.]+)\s+([\d.]+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)"
    return [f"training step, {m.group(1)}: {m.group(5)} tokens/s, {float(m.group(7)) / 1000:.2f} TFLOP/s "
            f"({m.group(8)}% of the same-run matmul)" for m in matches(text, step)]


def decode_rows(text: str) -> list[str]:
    rows = [f"{m.group(1)}: {m.group(3)} captions/s"
            for m in matches(text, r"(greedy \(batched\)|beam K=\d+ \(batched\))\s+([\d.]+)\s+([\d.]+)")]
    images = re.search(r"(\d+) images, max_length", text)
    return [f"decoding {images.group(1) if images else '?'} images, {r}" for r in rows]


def feature_rows(text: str) -> list[str]:
    row = r"(\w+)\s+(\d+)\s+(eager fp32|channels_last|default|bf16)\s+(\d+)\s+([\d.]+)\s+([\d.]+)"
    return [f"extraction {m.group(1)} at {m.group(2)} px, {m.group(3)}: {m.group(5)} images/s"
            for m in matches(text, row)]


def main(out: Path) -> None:
    lines = [line for line in read(out, "device.txt").splitlines() if line.strip()]
    lines += training_rows(read(out, "bench_train.txt")) or ["training step: not run"]
    lines += decode_rows(read(out, "bench_decode.txt")) or ["decoding: not run"]
    lines += feature_rows(read(out, "bench_features.txt")) or ["extraction: not run"]
    run = read(out, "default_run.txt")
    final = re.findall(r"final val.*", run)
    took = re.search(r"exit (\d+) after (\d+)s", run)
    lines.append("default run (python -m captioner.train): "
                 + (f"exit {took.group(1)}, {took.group(2)} s wall" if took else "not run")
                 + (f"; {final[-1]}" if final else ""))
    cuda = [line.split(" ")[1] for line in read(out, "cuda_tests.txt").splitlines() if line.startswith("PASSED")]
    failed = [line for line in read(out, "cuda_tests.txt").splitlines() if line.startswith(("FAILED", "ERROR"))]
    skipped = [line for line in read(out, "cuda_tests.txt").splitlines() if line.startswith("SKIPPED")]
    lines.append(f"CUDA tests passed ({len(cuda)}): {', '.join(t.split('::')[-1] for t in cuda) or 'none'}")
    if failed or skipped:
        lines.append(f"CUDA tests failed {len(failed)}, skipped {len(skipped)} (see tests_cuda.txt)")
    for group in sorted(out.glob("tests_[0-9].txt")):
        tail = [line for line in group.read_text(errors="replace").splitlines() if line.strip()][-1:]
        lines.append(f"test suite part {group.stem[-1]}: {tail[0] if tail else 'no output'}")
    width = max(map(len, lines))
    print("=" * width)
    print("\n".join(lines))
    print("=" * width)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check_out"))
