"""Each decoder's training steps at COCO size: cross-entropy tokens/s, and one self-critical step
against one cross-entropy step over as many captions.

    python scripts/bench_scst.py [--models show_tell,att2in] [--images 32] [--samples 5] [--words 16]
    python scripts/bench.py scst ...

Per decoder (its ``conf/model/<name>.yaml`` with every width at ``--dim``, 512 by default; random
weights; a 9,487-word vocabulary), on ``--images`` images whose features are a 14 x 14 x 2048
grid (ResNet's last block at 448 pixels; the decoders that read one pooled vector get the grid's
mean, 2048-d):

- cross-entropy, batch ``--images``: one step of ``--images`` captions of ``--words`` words, as
  ``python -m captioner.train`` runs it (``captioner.training.engine.train_one_epoch``: forward,
  loss, backward, clipping, Adam), in target tokens/s;
- SCST: what ``objective=scst`` runs per batch: ``--images`` images x ``--samples`` captions
  drawn without gradients, their CIDEr-D rewards (document frequencies from a corpus of
  ``--corpus`` images), the mean-of-samples baseline, the teacher-forced pass for the
  log-probabilities, backward and the Adam step;
- its reference, a cross-entropy step over images x samples captions of the length the samples
  reached (``--words``: random weights rarely stop early), each caption with its image's
  features, as a cross-entropy batch carries them: both sides process the same tokens.

Interleaved, best of ``--repeats``.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioner.config import DecodeConfig  # noqa: E402
from captioner.data import ImageRecord  # noqa: E402
from captioner.data.batches import Batch  # noqa: E402
from captioner.data.vocab import SPECIALS, Vocabulary  # noqa: E402
from captioner.models import MODELS, build_model  # noqa: E402
from captioner.objectives.cross_entropy import CrossEntropy  # noqa: E402
from captioner.objectives.scst import ScstConfig, SelfCritical  # noqa: E402
from captioner.training.engine import train_one_epoch  # noqa: E402
from captioner.training.optim import adam_options  # noqa: E402
from bench_train import make_tokens  # noqa: E402

WIDTHS = ("embed_dim", "hidden_dim", "attention_dim")


def model_config(name: str, dim: int):
    """``conf/model/<name>.yaml`` over its schema, every width set to ``dim``."""
    schema = OmegaConf.structured(MODELS.schema(name))
    node = OmegaConf.merge(schema, {k: v for k, v in OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml").items()
                                    if k != "defaults"})
    node.merge_with({width: dim for width in WIDTHS if width in node})
    return node


def run(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS.names()), help="decoders, comma-separated")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--words", type=int, default=16, help="decode.max_length, and the references' caption length")
    parser.add_argument("--regions", type=int, default=196)
    parser.add_argument("--feature", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--corpus", type=int, default=5000, help="training images the document frequencies come from")
    parser.add_argument("--vocab", type=int, default=9487)
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

    g = torch.Generator().manual_seed(args.seed)
    grid = torch.randn(args.images, args.regions, args.feature, generator=g)
    n = args.images * args.samples
    rows = torch.arange(args.images)
    cross_entropy = CrossEntropy()
    print(f"{args.images} images, {args.regions} x {args.feature} grids (pooled: their mean), widths {args.dim}, "
          f"vocabulary {len(vocab)}; SCST K={args.samples}, decode.max_length {args.words}, CIDEr-D corpus of "
          f"{args.corpus} images ({setup_s:.2f} s once); cross-entropy captions of {args.words} words; "
          f"best of {args.repeats}, interleaved")
    print(f"{'decoder':<18} {'params':>8} {'CE tokens/s':>12} {f'CE x{n} s':>10} {'SCST s':>8} "
          f"{'words':>6} {'SCST / CE':>10}")
    results = []
    for name in args.models.split(","):
        torch.manual_seed(args.seed)
        cfg = model_config(name, args.dim)
        features = grid if MODELS.get(name).reads_grid else grid.mean(dim=1)
        model = build_model(cfg, len(vocab), args.feature)
        optimizer = torch.optim.Adam(model.parameters(), lr=5e-5, **adam_options("cpu"))
        image_batch = Batch(features, torch.zeros(args.images, 1, dtype=torch.long), rows, rows + 1)
        small = Batch(features, make_tokens(torch.full((args.images,), args.words), len(vocab), g), rows)
        large = Batch(features.repeat_interleave(args.samples, 0),
                      make_tokens(torch.full((n,), args.words), len(vocab), g), torch.arange(n))
        lengths = []

        def scst_step():
            def compute(batch):
                out = scst(model, batch)
                lengths.append(out.figures["sample_length"])
                return out

            train_one_epoch(model, optimizer, None, [image_batch], "cpu", 5.0, compute=compute)

        def cross_entropy_step(batch):
            train_one_epoch(model, optimizer, None, [batch], "cpu", 5.0, compute=lambda b: cross_entropy(model, b))

        steps = {"small": lambda: cross_entropy_step(small), "large": lambda: cross_entropy_step(large),
                 "scst": scst_step}
        best = dict.fromkeys(steps, float("inf"))
        for step in steps.values():  # warm-up: first-call allocations
            step()
        for _ in range(args.repeats):
            for key, step in steps.items():
                start = time.perf_counter()
                step()
                best[key] = min(best[key], time.perf_counter() - start)
        params = sum(p.numel() for p in model.parameters())
        tokens_per_s = args.images * (args.words + 1) / best["small"]  # the targets: words and <eos>
        ratio = best["scst"] / best["large"]
        print(f"{name:<18} {params / 1e6:>7.2f}M {tokens_per_s:>12.0f} {best['large']:>10.3f} {best['scst']:>8.3f} "
              f"{sum(lengths) / len(lengths):>6.1f} {ratio:>9.2f}x")
        results.append({"model": name, "params": params, "cross_entropy_tokens_per_s": tokens_per_s,
                        "cross_entropy_s": best["large"], "scst_s": best["scst"], "ratio": ratio})
    return results


if __name__ == "__main__":
    run(sys.argv[1:])
