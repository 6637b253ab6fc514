"""The decoder and objective contracts, as a researcher adding a model uses them: a decoder and an
objective written only against the documented contract (examples/, the modules the docs show in
full) and registered under new names go through every path the built-in ones do."""
from __future__ import annotations

import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra.core.config_store import ConfigStore

from captioner.config import ModelConfig, ObjectiveConfig, decode_config
from captioner.caption import caption_folder
from captioner.evaluate import evaluate_checkpoint
from captioner.models import MODELS
from captioner.models.base import Decoder
from captioner.objectives import OBJECTIVES
from captioner.objectives.base import Objective
from captioner.objectives.cross_entropy import CrossEntropy
from captioner.registry import ContractError
from captioner.runtime import Interrupted
from captioner.training.checkpoint import load_checkpoint
from captioner.training.trainer import train
from conftest import TINY, compose_config
from trainrun import one_thread  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import focal_loss  # noqa: E402  (registers objective=focal_loss)
import gru_attention  # noqa: E402  (registers model=gru_attention)

# What conf/model/gru_attention.yaml and conf/objective/focal_loss.yaml would select.
ConfigStore.instance().store(group="model", name="gru_attention", node=gru_attention.GruAttentionConfig)
ConfigStore.instance().store(group="objective", name="focal_loss", node=focal_loss.FocalLossConfig)

FAST = ["train.epochs=1", "train.plot=false", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("contract")


def _cfg(root: Path, out: str, *overrides: str):
    return compose_config("train", [*TINY, f"data.root={root / 'data'}", f"train.out_dir={root / out}", *FAST,
                                    *overrides])


@pytest.fixture(scope="module")
def runs(root):
    """One epoch of each: the new decoder, the new objective (on Show and Tell), and a built-in
    decoder of each kind of features to ensemble them with."""
    train(_cfg(root, "gru", "model=gru_attention"))
    train(_cfg(root, "sat", "model=show_attend_tell", "model.attention_dim=16"))
    train(_cfg(root, "focal", "objective=focal_loss"))
    train(_cfg(root, "show_tell"))
    return {name: root / name / "best.pt" for name in ("gru", "sat", "focal", "show_tell")}


def _resumes_bitwise(root, name, objective: type, monkeypatch, *overrides):
    """Stopped by SIGINT in the middle of its first epoch and resumed, a run ends with the weights
    of the uninterrupted one."""
    train(_cfg(root, f"{name}_straight", *overrides, "train.epochs=2"))
    original, calls = objective.__call__, {"n": 0}

    def interrupting(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            signal.raise_signal(signal.SIGINT)
        return original(self, model, batch)

    with monkeypatch.context() as patch:
        patch.setattr(objective, "__call__", interrupting)
        with pytest.raises(Interrupted):
            train(_cfg(root, f"{name}_resumed", *overrides, "train.epochs=2"))
    assert load_checkpoint(root / f"{name}_resumed" / "last.pt")["step"] == 5
    train(_cfg(root, f"{name}_resumed", *overrides, "train.epochs=2", "train.resume=auto"))
    a, b = load_checkpoint(root / f"{name}_straight" / "last.pt"), load_checkpoint(root / f"{name}_resumed" / "last.pt")
    assert a["step"] == b["step"] > 5
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key


def _evaluates_and_captions(root, checkpoint: Path, tag: str, attends: bool):
    for method, options in (("greedy", {}), ("beam", {"beam_size": 3})):
        scores = evaluate_checkpoint(str(checkpoint), split="test", decode_cfg=decode_config(method=method, **options),
                                     metrics=("bleu", "cider"), tokenizer="python", output_dir=str(root / f"eval_{tag}"),
                                     device="cpu", progress=False, html=True)
        assert 0.0 <= scores["Bleu_4"] <= 1.0
        page = (root / f"eval_{tag}" / f"errors_test_{method}.html").read_text()
        assert "data:image/" in page and (page.count("class=\"strip\"") > 0) == attends
    folder = root / f"photos_{tag}"
    folder.mkdir(exist_ok=True)
    for image in sorted((root / "data" / "images").glob("test_*.png"))[:3]:
        shutil.copy(image, folder / image.name)
    caption_cfg = compose_config("caption", [f"folder={folder}", f"checkpoint={checkpoint}", "html=true",
                                             f"attention={str(attends).lower()}", f"output={root / tag}.json",
                                             "progress=false", "device=cpu"])
    summary = caption_folder(caption_cfg)
    assert len(summary["captions"]) == 3 and summary["html"].is_file()
    if attends:
        assert len(list(summary["attention"].glob("*.png"))) == 3


def _takes_scst(root, checkpoint: Path, tag: str, *overrides):
    metrics = train(_cfg(root, f"scst_{tag}", *overrides, "objective=scst", "objective.samples=2",
                         f"train.init_from={checkpoint}"))
    assert metrics["epoch"] == 1 and "train/reward" in metrics


def _ensembles(root, first: Path, second: Path, tag: str):
    scores = evaluate_checkpoint(str(first), split="test", decode_cfg=decode_config(method="beam", beam_size=3),
                                 metrics=("bleu",), tokenizer="python", output_dir=str(root / f"ensemble_{tag}"),
                                 device="cpu", progress=False, ensemble=[str(second)])
    assert 0.0 <= scores["Bleu_4"] <= 1.0
    assert (root / f"ensemble_{tag}" / "results_test_beam_ensemble2.json").is_file()


def test_a_decoder_written_to_the_contract_goes_through_every_path(root, runs, monkeypatch, one_thread):
    assert isinstance(torch.load(runs["gru"], weights_only=True), dict)
    _resumes_bitwise(root, "gru", CrossEntropy, monkeypatch, "model=gru_attention")
    _evaluates_and_captions(root, runs["gru"], "gru", attends=True)
    _takes_scst(root, runs["gru"], "gru", "model=gru_attention")
    _ensembles(root, runs["gru"], runs["sat"], "gru")


# The built-in decoders researchers compare against (captioner/models/att2in.py, updown.py,
# aoa.py), written against the same contract, through the same paths as the example decoder
# (their arithmetic and decoding: tests/test_attention_family.py).
BUILT_IN = {"att2in": ["model=att2in", "model.attention_dim=16"],
            "updown": ["model=updown", "model.attention_dim=16"],
            "aoa": ["model=aoa"],
            "aoa_refine": ["model=aoa", "model.refine=true", "model.refine_layers=2"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILT_IN)
def test_each_built_in_attention_decoder_goes_through_every_path(root, name, monkeypatch, one_thread):
    """Trains (the loss falls), resumes bitwise from a SIGINT mid-epoch, evaluates greedy and beam
    with the error page's attention strips, captions a folder with its attention PNGs, and takes
    SCST from its checkpoint."""
    _resumes_bitwise(root, name, CrossEntropy, monkeypatch, *BUILT_IN[name])
    history = load_checkpoint(root / f"{name}_straight" / "last.pt")["history"]
    assert len(history) == 2 and history[1]["train/loss"] < history[0]["train/loss"]
    checkpoint = root / f"{name}_straight" / "best.pt"
    _evaluates_and_captions(root, checkpoint, name, attends=True)
    _takes_scst(root, checkpoint, name, *BUILT_IN[name])


def test_an_objective_written_to_the_contract_goes_through_every_path(root, runs, monkeypatch, one_thread):
    history = load_checkpoint(runs["focal"])["history"]
    assert "train/token_prob" in history[0]  # its figures are logged like the built-in ones'
    _resumes_bitwise(root, "focal", focal_loss.FocalLoss, monkeypatch, "objective=focal_loss")
    _evaluates_and_captions(root, runs["focal"], "focal", attends=False)
    _takes_scst(root, runs["focal"], "focal")
    _ensembles(root, runs["focal"], runs["show_tell"], "focal")


@dataclass
class BrokenConfig(ModelConfig):
    name: str = "broken"


def test_a_decoder_that_lacks_a_method_fails_when_it_registers():
    class NoStep(Decoder):
        def init_state(self, features):
            return features

        def teacher_forced(self, features, tokens, where):
            raise NotImplementedError

        @classmethod
        def from_config(cls, cfg, vocab_size, feature_dim):
            return cls(vocab_size, feature_dim)

    with pytest.raises(ContractError, match=r"^model 'broken': NoStep lacks step \(the model contract: captioner/models/base.py\)$"):
        MODELS.register("broken", BrokenConfig)(NoStep)
    with pytest.raises(ContractError, match="must subclass captioner.models.base.Decoder"):
        MODELS.register("broken", BrokenConfig)(torch.nn.Module)
    assert "broken" not in MODELS.names()


def test_an_objective_that_lacks_a_method_fails_when_it_registers():
    @dataclass
    class NoCallConfig(ObjectiveConfig):
        name: str = "no_call"

    class NoCall(Objective):
        @classmethod
        def from_config(cls, cfg, context):
            return cls()

    with pytest.raises(ContractError, match=r"^objective 'no_call': NoCall lacks batches, __call__ \(the objective contract"):
        OBJECTIVES.register("no_call", NoCallConfig)(NoCall)
    assert "no_call" not in OBJECTIVES.names()


def test_the_docs_show_the_example_modules_in_full():
    models_page = (ROOT / "docs" / "models.md").read_text()
    for example in ("gru_attention.py", "focal_loss.py"):
        assert (ROOT / "examples" / example).read_text().strip() in models_page, example


def test_a_failure_in_validation_keeps_the_epoch(root, runs, monkeypatch):
    """last.pt is written before the epoch's validation decodes, so a decoder that trains but
    cannot decode loses no training."""
    def broken(self, *args, **kwargs):
        raise RuntimeError("decoding is broken")

    monkeypatch.setattr(gru_attention.GruAttention, "generate", broken)
    with pytest.raises(RuntimeError, match="decoding is broken"):
        train(_cfg(root, "broken_validation", "model=gru_attention"))
    ckpt = load_checkpoint(root / "broken_validation" / "last.pt")
    assert ckpt["epoch"] == 0 and ckpt["step"] == load_checkpoint(runs["gru"])["step"]  # the whole first epoch
