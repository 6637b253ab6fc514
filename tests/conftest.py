"""Shared fixtures: configs composed from the real conf/, tiny and CPU-only."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from captioner.cli import register_configs
from captioner.config import CONF_DIR

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# A few images, random CNN weights and two short epochs: the whole pipeline in seconds.
TINY = [
    "data.num_train=48",
    "data.num_val=12",
    "data.num_test=12",
    "data.image_size=64",
    "data.min_count=1",
    "encoder.pretrained=false",
    "encoder.batch_size=16",
    "encoder.compile=false",
    "model.embed_dim=32",
    "model.hidden_dim=48",
    "train.epochs=2",
    "train.batch_size=32",
    "train.progress=false",
    "train.plot=true",
    "train.device=cpu",
    "optim.warmup_steps=2",
]


def compose_config(config_name: str = "train", overrides=()):
    """The config as the command line composes it; the encoder eager unless a test says otherwise
    (compiling a CNN costs tens of seconds, more than a tiny extraction)."""
    overrides = list(overrides)
    if config_name in ("train", "extract") and not any(o.startswith("encoder.compile=") for o in overrides):
        overrides.append("encoder.compile=false")
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name, overrides=overrides)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """One tiny shapes data set (and its feature cache) shared by the tests of a session."""
    return tmp_path_factory.mktemp("shapes")


@pytest.fixture
def tiny_cfg(tmp_path, shapes_root):
    def make(*overrides):
        return compose_config("train", [*TINY, f"data.root={shapes_root}", f"train.out_dir={tmp_path / 'run'}", *overrides])

    return make


def cross_entropy_loss(model, features, tokens, label_smoothing: float = 0.0):
    """(loss, real target tokens) of the cross-entropy objective on one batch, as training computes it."""
    import torch

    from captioner.data.batches import Batch
    from captioner.objectives.cross_entropy import CrossEntropy

    out = CrossEntropy(label_smoothing)(model, Batch(features, tokens, torch.arange(tokens.size(0))))
    return out.loss, out.weight
