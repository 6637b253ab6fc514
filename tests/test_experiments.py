"""Every named experiment composes from the real conf/ and describes a buildable model."""
from pathlib import Path

import pytest

from captioner.config import CONF_DIR, validate
from captioner.encoding.encoders import ENCODER_DIMS
from captioner.models import build_model
from conftest import compose_config

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


def test_the_published_experiments_are_there():
    assert {"flickr8k", "neuraltalk2_coco", "nic_coco"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds(name):
    cfg = compose_config("train", [f"experiment={name}", "data.root=/nowhere"])
    validate(cfg)
    model = build_model(cfg.model, vocab_size=50, feature_dim=ENCODER_DIMS[cfg.encoder.name])
    assert model.feature_dim == ENCODER_DIMS[cfg.encoder.name]


def test_flickr8k_is_the_readme_benchmark():
    cfg = compose_config("train", ["experiment=flickr8k", "data.root=/nowhere"])
    assert (cfg.data.name, cfg.encoder.name, cfg.encoder.input_size, cfg.encoder.crop_pct) == \
        ("flickr8k", "efficientnet_lite0", 288, 1.0)
    assert (cfg.model.inject, cfg.decode.method, cfg.decode.beam_size, cfg.train.monitor) == \
        ("every_step", "beam", 3, "Bleu_4")
