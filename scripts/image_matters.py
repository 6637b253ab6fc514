"""Does the model use the image? Val BLEU with the real features vs features shuffled across images.

    python scripts/image_matters.py outputs/train/<run>/best.pt

A captioner that ignores the image scores the same either way; ours should drop sharply.
"""
from __future__ import annotations

import argparse

import numpy as np
from captioner.evaluation.loop import evaluate
from captioner.evaluate import checkpoint_split


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--split", default="val")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model, vocab, cfg, records, features = checkpoint_split(args.checkpoint, args.split, device="cpu",
                                                            progress=False)
    features = np.asarray(features)
    shuffled = features[np.random.default_rng(args.seed).permutation(len(features))]

    real, _ = evaluate(model, features, records, vocab, cfg.decode, "cpu")
    fake, _ = evaluate(model, shuffled, records, vocab, cfg.decode, "cpu")
    print(f"{args.split} BLEU-4 (0-1 scale): real features {real['Bleu_4']:.4f} | shuffled across images "
          f"{fake['Bleu_4']:.4f} | drop {real['Bleu_4'] - fake['Bleu_4']:.4f}")
    return {"real": real, "shuffled": fake}


if __name__ == "__main__":
    main()
