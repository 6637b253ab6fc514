"""CIDEr-D reward speed: captioner.objectives.rewards.CiderD against pycocoevalcap's CiderScorer.

    python scripts/bench_reward.py [--images 128] [--per-image 6] [--repeats 5]
    python scripts/bench.py reward ...

What self-critical training scores every step: ``--images`` training images with ``--per-image``
captions each (SCST's 5 samples + 1 greedy), against those images' references, with document
frequencies from the whole training split. Flickr8k when ../shared/data/flickr8k is there (the
6,000 training images' captions, PTB-tokenized as the toolkit does; candidates are half captions
of other images, half the image's own captions with their words shuffled), a synthetic corpus of
the same size otherwise.

The toolkit row is what a SCST loop built on pycocoevalcap does per batch: cook the candidates and
their references into a ``CiderScorer`` and run its ``compute_cider``, with the training split's
document frequencies (computed once, outside the timing) swapped in; ``compute_score`` would
recount them from the batch. ``CiderD.score`` gets the same batch. Both are timed in the same
process, interleaved, best of ``--repeats``; their scores must agree to 1e-9.
"""
from __future__ import annotations

import argparse
from collections import Counter
import random
import sys
import time
from pathlib import Path

import numpy as np
from pycocoevalcap.cider.cider_scorer import CiderScorer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.objectives.rewards import CiderD  # noqa: E402

FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"


class CorpusDfScorer(CiderScorer):
    """CiderScorer with the training split's document frequencies and ref_len (log N).

    ``compute_cider`` assigns ``self.ref_len = log(len(self.crefs))``; the property ignores it.
    """

    def __init__(self, document_frequency, ref_len):
        super().__init__()
        # a Counter: the toolkit's lookups of unseen n-grams read 0 without inserting them, so one
        # table serves every call (a defaultdict would grow)
        self.document_frequency = (document_frequency if isinstance(document_frequency, Counter)
                                   else Counter(document_frequency))
        self._corpus_ref_len = ref_len

    @property
    def ref_len(self):
        return self._corpus_ref_len

    @ref_len.setter
    def ref_len(self, value):
        pass


def _flickr8k_train() -> dict[str, list[list[str]]]:
    from captioner.data.tokenizer import tokenize_lines

    keys, lines = [], []
    for line in (FLICKR8K / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        key, _, caption = line.partition("\t")
        if caption.strip():
            keys.append(key.rpartition("#")[0])
            lines.append(caption)
    captions: dict[str, list[list[str]]] = {}
    for name, tokens in zip(keys, tokenize_lines(lines)):
        captions.setdefault(name, []).append(tokens)
    train = (FLICKR8K / "Flickr_8k.trainImages.txt").read_text(encoding="utf-8").split()
    return {name: captions[name] for name in train if name in captions}


def _synthetic_train(rng: random.Random, images: int = 6000, vocab: int = 3000) -> dict[int, list[list[str]]]:
    words = [f"w{i}" for i in range(vocab)]
    weights = [1.0 / (i + 1) for i in range(vocab)]  # Zipf-like, as caption words

    def caption():
        return rng.choices(words, weights, k=rng.randint(7, 16))

    return {i: [caption() for _ in range(5)] for i in range(images)}


def _batch(train: dict, images: int, per_image: int, rng: random.Random):
    names = list(train)
    batch = rng.sample(names, images)
    image_ids, candidates = [], []
    for name in batch:
        for k in range(per_image):
            if k % 2 == 0:  # another image's caption
                caption = list(rng.choice(train[rng.choice(names)]))
            else:  # the image's own words, shuffled
                caption = rng.sample(train[name][k % len(train[name])], len(train[name][k % len(train[name])]))
            image_ids.append(name)
            candidates.append(caption)
    return image_ids, candidates


def run(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--per-image", type=int, default=6, help="captions per image (5 samples + 1 greedy)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs per row; the fastest counts")
    parser.add_argument("--data", default="auto", choices=["auto", "flickr8k", "synthetic"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    use_flickr = args.data == "flickr8k" or (args.data == "auto" and (FLICKR8K / "Flickr8k.token.txt").is_file())
    train = _flickr8k_train() if use_flickr else _synthetic_train(rng)
    image_ids, candidates = _batch(train, args.images, args.per_image, rng)
    batch_refs = {name: train[name] for name in dict.fromkeys(image_ids)}

    start = time.perf_counter()
    cider = CiderD(train)
    build_s = time.perf_counter() - start
    df_scorer = CiderScorer()
    for refs in train.values():
        df_scorer += (None, [" ".join(r) for r in refs])
    df_scorer.compute_doc_freq()
    ref_len = np.log(float(len(df_scorer.crefs)))
    cand_lines = [" ".join(c) for c in candidates]
    ref_lines = {name: [" ".join(r) for r in refs] for name, refs in batch_refs.items()}

    document_frequency = Counter(df_scorer.document_frequency)

    def toolkit():
        scorer = CorpusDfScorer(document_frequency, ref_len)
        for name, line in zip(image_ids, cand_lines):
            scorer += (line, ref_lines[name])
        return np.array(scorer.compute_cider())

    cases = {
        "pycocoevalcap CiderScorer": toolkit,
        "CiderD.score": lambda: cider.score(image_ids, candidates),
        "CiderD.score(references=)": lambda: cider.score(image_ids, candidates, references=batch_refs),
    }
    best = {name: float("inf") for name in cases}
    out = {}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            out[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)

    reference = out["pycocoevalcap CiderScorer"]
    diffs = {name: float(np.abs(scores - reference).max()) for name, scores in out.items()}
    n = len(candidates)
    rows = [{"method": name, "captions": n, "seconds": round(best[name], 5),
             "captions_per_s": round(n / best[name], 1), "max_abs_diff": diffs[name]} for name in cases]

    data = "Flickr8k" if use_flickr else "synthetic"
    print(f"{data}: df from {len(train)} training images ({sum(map(len, train.values()))} captions); "
          f"batch {args.images} images x {args.per_image} captions, mean CIDEr-D {reference.mean():.3f}; "
          f"CiderD constructor {build_s:.2f} s (once per run); best of {args.repeats}, interleaved")
    print(f"{'method':<28} {'seconds':>9} {'captions/s':>11} {'max |diff|':>11}")
    for row in rows:
        print(f"{row['method']:<28} {row['seconds']:>9.4f} {row['captions_per_s']:>11.1f} {row['max_abs_diff']:>11.1e}")
    speedup = rows[1]["captions_per_s"] / rows[0]["captions_per_s"]
    rows[1]["speedup_vs_toolkit"] = round(speedup, 1)
    rows[2]["speedup_vs_toolkit"] = round(rows[2]["captions_per_s"] / rows[0]["captions_per_s"], 1)
    print(f"speed-up: {speedup:.1f}x (CiderD.score vs pycocoevalcap; with references=: "
          f"{rows[2]['speedup_vs_toolkit']:.1f}x)")
    worst = max(diffs.values())
    assert worst < 1e-9, f"CiderD differs from pycocoevalcap by {worst:.3g}"
    return rows


if __name__ == "__main__":
    run()
