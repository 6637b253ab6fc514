"""Paired significance speed: 1,000 paired bootstrap resamples of 5,000 images (COCO's Karpathy
test size) with 5 references each, against recomputing every resample with the toolkit.

    python scripts/bench_significance.py [--images 5000] [--resamples 1000] [--toolkit-resamples 3]
    python scripts/bench.py significance ...

The captions: MS-COCO val2014's when ../shared/data/coco-caption is there (5 references per image;
system A the image's 6th caption where it has one, else another image's; system B a caption of
another image), a Zipf-worded synthetic corpus otherwise. Timed in one process: the statistics
built once (tokenizing and scoring each system with the toolkit once, as any evaluation does),
the resamples (``CorpusStatistics.corpus``), and the toolkit scoring a file that holds each of
``--toolkit-resamples`` resamples' copies under ids of their own (what a bootstrap without the
per-image statistics does per resample), whose scores the fast ones must match to 1e-9.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.evaluation.metrics import score_captions  # noqa: E402
from captioner.evaluation.significance import METRICS, CorpusStatistics, draw_copies  # noqa: E402

COCO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-caption" / "captions_val2014.json"


def _coco(images: int):
    captions: dict[int, list[str]] = {}
    for ann in json.loads(COCO.read_text(encoding="utf-8"))["annotations"]:
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    ids = [i for i, caps in captions.items() if len(caps) >= 5][:images]
    others = ids[1:] + ids[:1]
    references = {i: captions[i][:5] for i in ids}
    first = {i: captions[i][5] if len(captions[i]) > 5 else captions[o][0] for i, o in zip(ids, others)}
    second = {i: captions[o][1] for i, o in zip(ids, others)}
    return references, first, second


def _synthetic(images: int, rng: random.Random):
    words = [f"w{i}" for i in range(3000)]
    weights = [1.0 / (i + 1) for i in range(len(words))]

    def caption():
        return " ".join(rng.choices(words, weights, k=rng.randint(7, 16)))

    references = {i: [caption() for _ in range(5)] for i in range(images)}
    return references, {i: caption() for i in references}, {i: caption() for i in references}


def run(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--toolkit-resamples", type=int, default=3)
    parser.add_argument("--data", default="auto", choices=["auto", "coco", "synthetic"])
    args = parser.parse_args(argv)

    use_coco = args.data == "coco" or (args.data == "auto" and COCO.is_file())
    references, first, second = _coco(args.images) if use_coco else _synthetic(args.images, random.Random(0))
    start = time.perf_counter()
    stats = CorpusStatistics(references, [first, second], "python")
    build_s = time.perf_counter() - start
    copies = draw_copies(stats.num_images, args.resamples, seed=0)
    start = time.perf_counter()
    fast = stats.corpus(copies)
    fast_s = time.perf_counter() - start

    toolkit_s, worst = 0.0, 0.0
    for b in range(args.toolkit_resamples):
        refs = {(image, c): references[image] for k, image in enumerate(stats.image_ids) for c in range(copies[b, k])}
        start = time.perf_counter()
        scored = [score_captions(refs, {key: system[key[0]] for key in refs}, ("bleu", "rouge", "cider"), "python")
                  for system in (first, second)]
        toolkit_s += time.perf_counter() - start
        worst = max(worst, *(abs(scored[s][m] - fast[s][m][b]) for s in range(2) for m in METRICS))
    per_resample_toolkit = toolkit_s / args.toolkit_resamples
    per_resample_fast = fast_s / args.resamples
    print(f"{'COCO val2014' if use_coco else 'synthetic'}: {stats.num_images} images x 5 references, 2 systems; "
          f"BLEU-4, ROUGE-L, CIDEr-D per resample")
    print(f"statistics (tokenize and score each system once): {build_s:.1f} s")
    print(f"{args.resamples} paired resamples: {fast_s:.2f} s ({per_resample_fast * 1e3:.1f} ms each)")
    print(f"toolkit per resample ({args.toolkit_resamples} timed): {per_resample_toolkit:.2f} s each "
          f"-> {per_resample_toolkit * args.resamples / 60:.0f} min for {args.resamples}")
    print(f"speed-up per resample: {per_resample_toolkit / per_resample_fast:.0f}x; "
          f"max |fast - toolkit| {worst:.1e}")
    assert worst < 1e-9, f"the resampled scores differ from the toolkit's by {worst:.3g}"
    return {"images": stats.num_images, "resamples": args.resamples, "build_s": build_s, "resamples_s": fast_s,
            "toolkit_per_resample_s": per_resample_toolkit, "max_abs_diff": worst}


if __name__ == "__main__":
    run()
