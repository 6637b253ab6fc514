import json

import pytest
import torch
from omegaconf import OmegaConf

from captioner.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from captioner.models import build_model
from captioner.trainer import train
from captioner.vocab import Vocabulary


def test_tiny_train_run_from_real_config(tiny_cfg):
    cfg = tiny_cfg()
    final = train(cfg)
    out = cfg.train.out_dir
    assert final["epoch"] == 2 and 0.0 <= final["val/Bleu_4"] <= 1.0
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train/loss"] < rows[0]["train/loss"] or rows[0]["train/loss"] < 3.0
    for name in ("last.pt", "best.pt", "vocab.json", "curves.png"):
        assert (out and __import__("pathlib").Path(out, name).is_file()), name


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
