"""The Show-Attend-Tell decoder: shapes, gradients, attention weights, and that every decoding
method treats it exactly as it treats Show and Tell (the one-step protocol)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from captioner.decoding.search import generate
from captioner.models import MODELS, reads_grid
from captioner.models.show_attend_tell import ShowAttendTell
from captioner.data.vocab import BOS_ID, EOS_ID, PAD_ID
from conftest import compose_config, cross_entropy_loss
from test_decoding import reference_beam

VOCAB, REGIONS, CHANNELS = 14, 9, 10


def make_model(seed=0, scale=0.6, eos_bias=1.0, gate=True) -> ShowAttendTell:
    """Random float64 weights with peaked distributions (as test_decoding's make_model), so
    captions end at different lengths and beams disagree."""
    torch.manual_seed(seed)
    model = ShowAttendTell(VOCAB, CHANNELS, embed_dim=8, hidden_dim=12, attention_dim=6, dropout=0.0,
                           gate=gate).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)
        model.output.weight.mul_(3.0)
        model.output.bias[EOS_ID] += eos_bias
    return model.eval()


def regions(n=6, seed=1) -> torch.Tensor:
    return torch.randn(n, REGIONS, CHANNELS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def captions(n=6, length=7, seed=2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, VOCAB, (n, length + 2), generator=g)
    tokens[:, 0] = BOS_ID
    for i in range(n):  # different lengths: <eos> then padding
        end = 2 + i % length
        tokens[i, end] = EOS_ID
        tokens[i, end + 1 :] = PAD_ID
    return tokens


def test_registered_and_reads_the_grid():
    cfg = compose_config("train", ["model=show_attend_tell"])
    assert MODELS.get("show_attend_tell") is ShowAttendTell
    assert reads_grid(cfg.model) and not reads_grid(compose_config("train").model)


@pytest.mark.parametrize("gate", [True, False])
def test_shapes_and_a_gradient_for_every_parameter(gate):
    model = make_model(gate=gate).train()
    feats, tokens = regions(), captions()
    assert model(feats, tokens).shape == (6, tokens.size(1) - 1, VOCAB)
    loss, n = cross_entropy_loss(model, feats, tokens)
    assert n == int((tokens[:, 1:] != PAD_ID).sum())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_attention_weights_are_a_distribution_over_regions():
    model, feats = make_model(), regions()
    maps = model.attention_maps(feats, captions())
    assert maps.shape == (6, 8, REGIONS)
    assert bool((maps >= 0).all())
    assert torch.allclose(maps.sum(dim=2), torch.ones(6, 8, dtype=torch.float64))
    state = model.init_state(feats)
    _, state = model.next_logprobs(torch.full((6,), BOS_ID), state)
    assert torch.allclose(state.attention, maps[:, 0])  # a step leaves the weights it used


def test_attention_penalty_is_the_doubly_stochastic_term():
    model, feats, tokens = make_model(), regions(), captions()
    model.attention_penalty = 0.0
    plain, _ = cross_entropy_loss(model, feats, tokens)
    model.attention_penalty = 0.5
    penalized, _ = cross_entropy_loss(model, feats, tokens)
    alphas = model.attention_maps(feats, tokens) * (tokens[:, 1:] != PAD_ID).unsqueeze(2)
    expected = 0.5 * ((1 - alphas.sum(dim=1)) ** 2).mean()
    assert float((penalized - plain).detach()) == pytest.approx(float(expected), rel=1e-10)


def test_step_by_step_scores_equal_teacher_forcing():
    model, feats, tokens = make_model(), regions(), captions()
    logprobs = model.sequence_logprobs(feats, tokens)
    state, total = model.init_state(feats), torch.zeros(6, dtype=torch.float64)
    for t in range(tokens.size(1) - 1):
        step, state = model.next_logprobs(tokens[:, t], state)
        real = tokens[:, t + 1] != PAD_ID
        total += torch.where(real, step.gather(1, tokens[:, t + 1 : t + 2]).squeeze(1), 0.0)
    assert torch.allclose(logprobs.double(), total, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_batched_beam_matches_the_per_image_reference(k):
    model, feats, max_length = make_model(seed=k), regions(seed=k + 10), 9
    out = generate(model, feats, method="beam", beam_size=k, max_length=max_length, n_best=k)
    n_best = out.n_best or [[(seq, score)] for seq, score in zip(out.sequences, out.scores)]
    lengths = set()
    for b in range(feats.size(0)):
        ref = reference_beam(model, feats[b : b + 1], k, max_length)
        assert [ids for ids, _ in n_best[b]] == [words for _, words in ref]
        assert [s for _, s in n_best[b]] == pytest.approx([s for s, _ in ref], rel=1e-12, abs=1e-12)
        lengths |= {len(ids) for ids, _ in n_best[b]}
    if k > 1:
        assert len(lengths) > 1


def test_beam_one_is_greedy_and_a_batch_is_its_images():
    model, feats = make_model(seed=5), regions(9, seed=5)
    greedy = generate(model, feats, method="greedy", max_length=10)
    beam = generate(model, feats, method="beam", beam_size=1, max_length=10)
    assert beam.sequences == greedy.sequences
    assert beam.scores == pytest.approx(greedy.scores, rel=1e-12, abs=1e-12)
    for method in ("greedy", "beam"):
        batch = generate(model, feats, method=method, beam_size=3, max_length=10)
        one_by_one = [generate(model, feats[i : i + 1], method=method, beam_size=3, max_length=10).sequences[0]
                      for i in range(feats.size(0))]
        assert batch.sequences == one_by_one


def test_tiny_attention_run_trains_captions_and_takes_scst(tiny_cfg, tmp_path):
    """The pipeline unchanged around the attention decoder: grid features cached and read,
    validation by decoding, best.pt captioning images through its own grid encoder, and SCST
    from it."""
    import json

    from captioner import Captioner
    from captioner.data import load_records
    from captioner.training.trainer import train

    small = ["model=show_attend_tell", "model.embed_dim=16", "model.hidden_dim=24", "model.attention_dim=8"]
    cfg = tiny_cfg(*small)
    assert train(cfg)["epoch"] == 2
    rows = [json.loads(line) for line in open(f"{cfg.train.out_dir}/metrics.jsonl")]
    assert rows[1]["train/loss"] < rows[0]["train/loss"]
    assert sorted(p.name for p in Path(cfg.data.root, "features").glob("*_grid_*.npy")) == [
        "efficientnet_lite0_grid_test.npy", "efficientnet_lite0_grid_train.npy", "efficientnet_lite0_grid_val.npy"]
    captioner = Captioner.from_checkpoint(f"{cfg.train.out_dir}/best.pt", device="cpu")
    assert captioner.encoder.grid
    val = load_records(cfg.data)["val"][:4]
    assert all("caption" in c for c in captioner.caption_images([r.path for r in val]))

    scst = tiny_cfg(*small, "objective=scst", "train.epochs=1", f"train.init_from={cfg.train.out_dir}/best.pt",
                    f"train.out_dir={tmp_path / 'scst'}", "train.monitor=CIDEr")
    assert "train/reward" in train(scst)


def test_a_checkpoint_with_the_old_score_bias_loads_and_attends_the_same():
    """The score layer lost its bias (a softmax does not see a shift: that bias had an exactly
    zero gradient and never learned). Weights saved with one load, and give the same attention."""
    model, feats, tokens = make_model(), regions(), captions()
    state = {**model.state_dict(), "score.bias": torch.tensor([0.7], dtype=torch.float64)}
    again = make_model(seed=5)
    again.load_state_dict(state)
    torch.testing.assert_close(again.attention_maps(feats, tokens), model.attention_maps(feats, tokens))


def test_init_from_a_checkpoint_of_another_attention_size_names_the_key(tiny_cfg, tmp_path):
    """Shape keys come from each model's schema (shapes=True), so the one-line refusal names
    model.attention_dim and both values, not a state-dict size mismatch."""
    from captioner.training.checkpoint import CheckpointError
    from captioner.training.trainer import train

    small = ["model=show_attend_tell", "model.embed_dim=16", "model.hidden_dim=24", "train.epochs=1"]
    first = tiny_cfg(*small, "model.attention_dim=8")
    train(first)
    other = tiny_cfg(*small, "model.attention_dim=12", f"train.init_from={first.train.out_dir}/best.pt",
                     f"train.out_dir={tmp_path / 'other'}")
    with pytest.raises(CheckpointError, match=r"another model shape \(model.attention_dim=8 there, 12 here\)"):
        train(other)
    show_tell = tiny_cfg("train.epochs=1", f"train.init_from={first.train.out_dir}/best.pt",
                         f"train.out_dir={tmp_path / 'show_tell'}", "model=show_tell")
    with pytest.raises(CheckpointError, match=r"holds another decoder \(model.name=show_attend_tell there, show_tell"):
        train(show_tell)
