"""Every named experiment composes from the real conf/ and describes a buildable model."""
from pathlib import Path

import pytest

from captioner.config import CONF_DIR, validate
from captioner.encoding.encoders import ENCODER_DIMS
from captioner.models import MODELS, build_model, reads_grid
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


GRID_DECODERS = [name for name in MODELS.names() if reads_grid({"name": name})]


@pytest.mark.parametrize("model", GRID_DECODERS)
@pytest.mark.parametrize("name", ["flickr8k_att", "flickr8k_att_scst"])
def test_the_flickr8k_attention_experiments_take_every_grid_decoder(name, model):
    # the attention family's table trains each decoder as experiment=flickr8k_att model=NAME
    cfg = compose_config("train", [f"experiment={name}", f"model={model}", "data.root=/nowhere"])
    validate(cfg)
    assert (cfg.model.name, cfg.model.embed_dim, cfg.model.hidden_dim) == (model, 512, 512)
    if "attention_dim" in cfg.model:
        assert cfg.model.attention_dim == 512
    build_model(cfg.model, vocab_size=50, feature_dim=ENCODER_DIMS[cfg.encoder.name])


def test_show_attend_tells_attention_is_as_wide_as_its_lstm_unless_set():
    assert compose_config("train", ["model=show_attend_tell"]).model.attention_dim == 256
    assert compose_config("train", ["model=show_attend_tell", "model.hidden_dim=64"]).model.attention_dim == 64
    assert compose_config("train", ["model=show_attend_tell", "model.attention_dim=32"]).model.attention_dim == 32
