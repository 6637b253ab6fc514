"""One self-critical training step against one cross-entropy step over as many captions.

    python scripts/bench_scst.py [--images 128] [--samples 5] [--words 16] [--repeats 3]
    python scripts/bench.py scst ...

The SCST step is what ``python -m captioner.train objective=scst`` runs per batch
(``captioner.training.engine.train_one_epoch`` with the ``scst`` objective): ``--images`` images x
``--samples`` captions drawn without gradients, their CIDEr-D rewards (document frequencies from
a training corpus of ``--corpus`` images), the mean-of-samples baseline, one teacher-forced pass
for the log-probabilities, backward and the Adam step. The reference is a plain cross-entropy
step (the ``cross_entropy`` objective) on images x samples captions of ``--words`` words: the
length the samples reach with random weights, so both sides process the same tokens. COCO size
by default (VGG16's 4096-d feature, 512-d LSTM, 9,487 words). Interleaved, best of ``--repeats``.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.config import DecodeConfig  # noqa: E402
from captioner.data import ImageRecord  # noqa: E402
from captioner.training.engine import train_one_epoch  # noqa: E402
from captioner.models.show_tell import ShowTell  # noqa: E402
from captioner.data.batches import Batch  # noqa: E402
from captioner.objectives.cross_entropy import CrossEntropy  # noqa: E402
from captioner.objectives.scst import ScstConfig, SelfCritical  # noqa: E402
from captioner.training.optim import adam_options  # noqa: E402
from captioner.data.vocab import SPECIALS, Vocabulary  # noqa: E402
from bench_train import make_tokens  # noqa: E402


def run(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--words", type=int, default=16, help="decode.max_length, and the reference's caption length")
    parser.add_argument("--corpus", type=int, default=5000, help="training images the document frequencies come from")
    parser.add_argument("--vocab", type=int, default=9487)
    parser.add_argument("--embed", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--feature", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    words = [f"w{i}" for i in range(args.vocab - len(SPECIALS))]
    vocab = Vocabulary([*SPECIALS, *words])
    records = [ImageRecord(i, f"{i}.jpg", [" ".join(rng.choices(words, k=rng.randint(8, 16))) for _ in range(5)])
               for i in range(args.corpus)]
    decode = OmegaConf.structured(DecodeConfig(max_length=args.words))
    started = time.perf_counter()
    scst = SelfCritical(OmegaConf.structured(ScstConfig(samples=args.samples)), vocab, records, decode)
    setup_s = time.perf_counter() - started

    torch.manual_seed(args.seed)
    model = ShowTell(len(vocab), args.feature, embed_dim=args.embed, hidden_dim=args.hidden, dropout=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-5, **adam_options("cpu"))
    g = torch.Generator().manual_seed(args.seed)
    features = torch.randn(args.images, args.feature, generator=g)
    rows = torch.arange(args.images)
    image_batch = Batch(features, torch.zeros(args.images, 1, dtype=torch.long), rows, rows + 1)
    n = args.images * args.samples
    caption_batch = Batch(features.repeat_interleave(args.samples, 0),
                          make_tokens(torch.full((n,), args.words), len(vocab), g), torch.arange(n))
    cross_entropy = CrossEntropy()
    lengths = []

    def scst_step():
        def compute(batch):
            out = scst(model, batch)
            lengths.append(out.figures["sample_length"])
            return out

        train_one_epoch(model, optimizer, None, [image_batch], "cpu", 5.0, compute=compute)

    def cross_entropy_step():
        train_one_epoch(model, optimizer, None, [caption_batch], "cpu", 5.0,
                        compute=lambda batch: cross_entropy(model, batch))

    best = {"scst": float("inf"), "cross_entropy": float("inf")}
    steps = {"scst": scst_step, "cross_entropy": cross_entropy_step}
    for name, step in steps.items():  # warm-up: first-call allocations
        step()
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - start)

    print(f"{args.images} images x {args.samples} samples, decode.max_length {args.words}, vocabulary {len(vocab)}, "
          f"feature {args.feature}, LSTM {args.embed}/{args.hidden}; CIDEr-D corpus of {args.corpus} images "
          f"({setup_s:.2f} s once); samples averaged {sum(lengths) / len(lengths):.1f} words")
    print(f"{'step':<44} {'s':>8} {'captions/s':>11}")
    results = []
    for name, label in (("cross_entropy", f"cross-entropy, {n} captions of {args.words} words"),
                        ("scst", f"SCST (K={args.samples}, mean baseline, reward included)")):
        print(f"{label:<44} {best[name]:>8.3f} {n / best[name]:>11.1f}")
        results.append({"step": name, "seconds": best[name]})
    print(f"SCST step / cross-entropy step: {best['scst'] / best['cross_entropy']:.2f}x")
    return results


if __name__ == "__main__":
    run(sys.argv[1:])
