"""Does the model use the image? Val BLEU with the real features vs features shuffled across images.

    python scripts/image_matters.py outputs/train/<run>/best.pt

A captioner that ignores the image scores the same either way; ours should drop sharply.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from captioner.checkpoint import restore_model
from captioner.datasets import load_records
from captioner.encoders import build_encoder
from captioner.engine import evaluate
from captioner.train import load_split_features


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--split", default="val")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model, vocab, cfg = restore_model(args.checkpoint)
    records = {args.split: load_records(cfg.data)[args.split]}
    encoder = build_encoder(cfg.encoder.name, pretrained=cfg.encoder.pretrained, weights=cfg.encoder.weights)
    features = np.asarray(load_split_features(cfg, encoder, records, torch.device("cpu"))[args.split])
    shuffled = features[np.random.default_rng(args.seed).permutation(len(features))]

    real, _ = evaluate(model, features, records[args.split], vocab, cfg.decode, "cpu")
    fake, _ = evaluate(model, shuffled, records[args.split], vocab, cfg.decode, "cpu")
    print(f"{args.split} BLEU-4 (0-1 scale): real features {real['Bleu_4']:.4f} | shuffled across images "
          f"{fake['Bleu_4']:.4f} | drop {real['Bleu_4'] - fake['Bleu_4']:.4f}")
    return {"real": real, "shuffled": fake}


if __name__ == "__main__":
    main()
