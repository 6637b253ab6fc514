"""Ensembles: decoded through the same code as one model, probabilities averaged."""
import copy
import json
import math
import subprocess
import sys

import pytest
import torch

from captioner.decoding.search import generate
from captioner.decoding.ensemble import Ensemble
from captioner.models.show_tell import ShowTell
from captioner.data.vocab import BOS_ID
from conftest import TINY
from trainrun import assert_one_line_error, env

V, D = 19, 6


def _models(n=2):
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        models.append(ShowTell(V, D, embed_dim=8, hidden_dim=12, dropout=0.0).eval())
    return models


def test_next_logprobs_is_the_log_of_the_mean_probability():
    a, b = _models()
    features, tokens = torch.randn(3, D), torch.full((3,), BOS_ID)
    logp, _ = Ensemble([a, b]).next_logprobs(tokens, Ensemble([a, b]).init_state(features))
    pa, _ = a.next_logprobs(tokens, a.init_state(features))
    pb, _ = b.next_logprobs(tokens, b.init_state(features))
    assert torch.allclose(logp.exp(), (pa.exp() + pb.exp()) / 2, atol=1e-6)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("method,options", [("greedy", {}), ("beam", {"beam_size": 3})])
def test_copies_of_one_model_decode_as_that_model(method, options):
    (model,) = _models(1)
    features = torch.randn(4, D)
    single = generate(model, features, method=method, max_length=8, **options)
    both = Ensemble([model, copy.deepcopy(model)]).generate(features, method=method, max_length=8, **options)
    assert both.sequences == single.sequences
    assert all(math.isclose(x, y, abs_tol=1e-4) for x, y in zip(both.scores, single.scores))


def test_members_must_agree_on_vocabulary_and_features():
    (model,) = _models(1)
    with pytest.raises(ValueError, match="vocabulary size"):
        Ensemble([model, ShowTell(V + 1, D, embed_dim=8, hidden_dim=12)])
    with pytest.raises(ValueError, match="at least two"):
        Ensemble([model])


def _train(shapes_root, run_dir, *overrides):
    cmd = [sys.executable, "-m", "captioner.train", *TINY, f"data.root={shapes_root}", f"train.out_dir={run_dir}",
           "train.epochs=1", "train.plot=false", f"hydra.run.dir={run_dir}/hydra", *overrides]
    out = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def _evaluate(*overrides):
    cmd = [sys.executable, "-m", "captioner.evaluate", "split=test", "metrics=[bleu]", "tokenizer=python",
           "progress=false", *overrides]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)


def test_evaluate_decodes_an_ensemble_of_checkpoints(shapes_root, tmp_path):
    a, b, other = tmp_path / "a", tmp_path / "b", tmp_path / "other"
    _train(shapes_root, a, "train.seed=1")
    _train(shapes_root, b, "train.seed=2")
    out = _evaluate(f"checkpoint={a}/last.pt", f"ensemble=[{b}/last.pt]", "decode=beam", "decode.beam_size=2")
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((a / "metrics_test_beam_ensemble2.json").read_text())
    assert report["ensemble"] == [f"{b}/last.pt"]
    assert not (a / "metrics_test_beam.json").exists()  # the single model's report is not overwritten
    single = _evaluate(f"checkpoint={a}/last.pt", "decode=beam", "decode.beam_size=2")
    assert single.returncode == 0, single.stderr[-2000:]
    # the ensemble decodes as neither member alone: its captions are its own
    ensemble_captions = json.loads((a / "results_test_beam_ensemble2.json").read_text())
    single_captions = json.loads((a / "results_test_beam.json").read_text())
    assert [r["image_id"] for r in ensemble_captions] == [r["image_id"] for r in single_captions]
    assert [r["caption"] for r in ensemble_captions] != [r["caption"] for r in single_captions]

    _train(shapes_root, other, "data.min_count=40")  # fewer words: another vocabulary
    out = _evaluate(f"checkpoint={a}/last.pt", f"ensemble=[{other}/last.pt]")
    assert_one_line_error(out, "another vocabulary", "data.min_count")
