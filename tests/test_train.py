import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from captioner.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from captioner.models import build_model
from captioner.training.trainer import train
from captioner.data.vocab import Vocabulary


def test_tiny_train_run_from_real_config(tiny_cfg):
    cfg = tiny_cfg()
    final = train(cfg)
    out = cfg.train.out_dir
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2] and final["epoch"] == 2
    assert final == {**rows[1], "best/Bleu_4": max(r["val/Bleu_4"] for r in rows)}
    assert rows[1]["train/loss"] < rows[0]["train/loss"]  # it learns
    assert rows[1]["val/Bleu_1"] > 0.3  # from nothing to shape words in 16 steps
    for name in ("last.pt", "best.pt", "vocab.json", "curves.png"):
        assert Path(out, name).is_file(), name


def test_the_checkpoint_holds_the_model_that_was_validated(tiny_cfg):
    """best.pt decodes the val split to exactly the BLEU that training measured for that epoch."""
    from captioner.training.restore import restore_model
    from captioner.data import load_records
    from captioner.evaluation.loop import evaluate
    from captioner.encoding.features import feature_cache_dir, split_features

    cfg = tiny_cfg("train.epochs=1")
    final = train(cfg)
    restored = restore_model(f"{cfg.train.out_dir}/best.pt")
    encoder = restore_model(f"{cfg.train.out_dir}/best.pt", with_encoder=True).encoder
    val = load_records(cfg.data)["val"]
    features = split_features(encoder, val, feature_cache_dir(cfg.data, cfg.encoder), "val", progress=False).features
    scores, _ = evaluate(restored.model, features, val, restored.vocab, cfg.decode, "cpu")
    assert (scores["Bleu_1"], scores["Bleu_4"]) == (final["val/Bleu_1"], final["val/Bleu_4"])


def test_checkpoint_round_trip_gives_identical_outputs(tiny_cfg):
    cfg = tiny_cfg("train.epochs=1")
    train(cfg)
    ckpt = load_checkpoint(f"{cfg.train.out_dir}/last.pt")
    assert set(ckpt) >= {"config", "vocab", "model", "optimizer", "scheduler", "step", "epoch"}
    vocab = Vocabulary.from_dict(ckpt["vocab"])
    saved_cfg = OmegaConf.create(ckpt["config"])
    model = build_model(saved_cfg.model, len(vocab), ckpt["feature_dim"])
    model.load_state_dict(ckpt["model"])
    model.eval()

    features = torch.randn(3, ckpt["feature_dim"])
    tokens = torch.randint(1, len(vocab), (3, 6))
    path = f"{cfg.train.out_dir}/copy.pt"
    save_checkpoint(path, ckpt)
    again = build_model(saved_cfg.model, len(vocab), ckpt["feature_dim"])
    again.load_state_dict(load_checkpoint(path)["model"])
    again.eval()
    assert torch.equal(model(features, tokens), again(features, tokens))
    assert model.generate(features).sequences == again.generate(features).sequences


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
