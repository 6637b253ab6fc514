"""The attention decoders researchers compare against (Att2in, Up-Down, AoA): each one's own
arithmetic against an independent statement of it (nn.LSTMCell, nn.MultiheadAttention, the
paper's gate structure), attention that is a distribution over the regions, per-image work done
once per image, and the decoding protocol: batched beam search returns the per-image reference
search's hypotheses, a batch captions as its images one at a time, ensembles of them beam-search
as the reference. (Training, resume, evaluation, captioning and SCST of each: test_contract.py.)"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captioner.config import validate
from captioner.data.vocab import BOS_ID, EOS_ID, PAD_ID
from captioner.decoding.ensemble import Ensemble
from captioner.decoding.search import draw, generate
from captioner.models import MODELS, build_model, reads_grid, shape_keys
from captioner.models.aoa import AoA
from captioner.models.att2in import Att2in
from captioner.models.updown import UpDown
from conftest import compose_config, cross_entropy_loss
from test_decoding import reference_beam

ROOT = Path(__file__).resolve().parents[1]
VOCAB, REGIONS, CHANNELS = 14, 9, 10

# name -> (class, its tiny keyword arguments); aoa twice: the decoder alone and with the refiner
DECODERS = {
    "att2in": (Att2in, {"embed_dim": 8, "hidden_dim": 12, "attention_dim": 6}),
    "updown": (UpDown, {"embed_dim": 8, "hidden_dim": 12, "attention_dim": 6}),
    "aoa": (AoA, {"embed_dim": 8, "hidden_dim": 12, "heads": 3}),
    "aoa_refine": (AoA, {"embed_dim": 8, "hidden_dim": 12, "heads": 3, "refine": True, "refine_layers": 2}),
}
NAMES = list(DECODERS)
# (the <eos> bias, the weights' scale, a seed offset) for each: captions of many lengths, below
TEST_WEIGHTS = {
    "att2in": (2.0, 0.5, 0),
    "updown": (2.0, 0.5, 0),
    "aoa": (3.0, 0.5, 0),
    "aoa_refine": (5.0, 0.5, 10),
}
# the modules that read the regions alone: run once per image, never per step or per beam
PER_IMAGE = {
    "att2in": ["region_key"],
    "updown": ["region_key"],
    "aoa": ["region_embed", "key_value"],
    "aoa_refine": ["region_embed", "refiner", "key_value"],
}


def make_model(name: str, seed=0, dropout=0.0):
    """Random float64 weights with peaked distributions (as test_attention's make_model), so
    captions end at different lengths and beams disagree."""
    eos_bias, scale, offset = TEST_WEIGHTS[name]
    torch.manual_seed(seed + offset)
    cls, options = DECODERS[name]
    model = cls(VOCAB, CHANNELS, dropout=dropout, **options).double()
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


# --- the registry, the config files --------------------------------------------------------------

@pytest.mark.parametrize("name, cls", [("att2in", Att2in), ("updown", UpDown), ("aoa", AoA)])
def test_registered_from_the_real_conf_reading_the_grid(name, cls):
    cfg = compose_config("train", [f"model={name}"])
    assert MODELS.get(name) is cls and cls.reads_grid and cls.attends
    assert reads_grid(cfg.model)
    model = build_model(cfg.model, VOCAB, 1280)
    assert type(model) is cls and cfg.model.hidden_dim == cfg.model.embed_dim == 512
    assert {"embed_dim", "hidden_dim"} <= set(shape_keys(name))
    assert cfg.model.dropout == 0.5


@pytest.mark.parametrize("name", MODELS.names())
def test_every_registered_model_composes_validates_and_builds(name):
    """Each registered decoder has its conf/model/<name>.yaml, which composes into a valid node
    of its schema and builds the class that registered."""
    assert (ROOT / "conf" / "model" / f"{name}.yaml").is_file()
    cfg = compose_config("train", [f"model={name}", "model.embed_dim=16", "model.hidden_dim=24"])
    validate(cfg)
    model = build_model(cfg.model, VOCAB, CHANNELS)
    assert isinstance(model, MODELS.get(name)) and model.vocab_size == VOCAB and model.feature_dim == CHANNELS


@pytest.mark.parametrize("name", MODELS.names())
def test_every_decoder_drops_out_in_step_what_teacher_forcing_drops(name):
    """In training mode (SCST with objective.dropout=true samples so), a step applies the dropout
    teacher forcing applies: at p = 1 both leave the output layer nothing but its bias."""
    cfg = compose_config("train", [f"model={name}", "model.embed_dim=16", "model.hidden_dim=24", "model.dropout=1.0"])
    model = build_model(cfg.model, VOCAB, CHANNELS).train()
    feats = (regions(3) if model.reads_grid else regions(3).mean(dim=1)).float()
    tokens = torch.tensor([[BOS_ID, 5, EOS_ID]] * 3)
    forced = model.teacher_forced(feats, tokens, torch.ones(3, 2, dtype=torch.bool)).logits.view(3, 2, -1)
    stepped, _ = model.step(tokens[:, 0], model.init_state(feats))
    torch.testing.assert_close(stepped, forced[:, 0], rtol=0, atol=1e-6)


def test_heads_must_divide_the_hidden_size():
    with pytest.raises(ValueError, match=r"^model.heads=5: must divide model.hidden_dim=512$"):
        validate(compose_config("train", ["model=aoa", "model.heads=5"]))


# --- the shared properties ----------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_a_gradient_for_every_parameter(name):
    model = make_model(name, dropout=0.3).train()
    feats, tokens = regions(), captions()
    assert model(feats, tokens).shape == (6, tokens.size(1) - 1, VOCAB)
    loss, n = cross_entropy_loss(model, feats, tokens)
    assert n == int((tokens[:, 1:] != PAD_ID).sum())
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), pname


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_step_by_step_equals_teacher_forcing(name):
    model, feats, tokens = make_model(name), regions(), captions()
    where = tokens[:, 1:] != PAD_ID
    forced = model.teacher_forced(feats, tokens, where)
    assert forced.penalty is None
    state, logits = model.init_state(feats), []
    for t in range(tokens.size(1) - 1):
        step, state = model.step(tokens[:, t], state)
        logits.append(step)
        torch.testing.assert_close(state.attention, forced.attention[:, t], rtol=0, atol=1e-12)
    torch.testing.assert_close(forced.logits, torch.stack(logits, dim=1)[where], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_attention_weights_are_a_distribution_over_regions(name):
    model, feats = make_model(name), regions()
    maps = model.attention_maps(feats, captions())
    assert maps.shape == (6, 8, REGIONS)
    assert bool((maps >= 0).all())
    torch.testing.assert_close(maps.sum(dim=2), torch.ones(6, 8, dtype=torch.float64), rtol=0, atol=1e-12)
    # recomputed at every step of every image, not once per caption or per batch
    assert not torch.allclose(maps[:, 0], maps[:, 1]) and not torch.allclose(maps[0], maps[1])
    _, state = model.next_logprobs(torch.full((6,), BOS_ID), model.init_state(feats))
    torch.testing.assert_close(state.attention, maps[:, 0])  # a step leaves the weights it used


def count_calls(model, names: list[str]) -> dict:
    """The batch sizes each of ``names`` (submodules) was called with, as the model runs."""
    calls = {n: [] for n in names}
    for n in names:
        getattr(model, n).register_forward_hook(lambda m, args, out, n=n: calls[n].append(args[0].size(0)))
    return calls


@pytest.mark.parametrize("name", NAMES)
def test_the_regions_are_read_once_per_image(name):
    """What depends on the regions alone (their embedding, refinement, keys and values) is computed
    once per image in init_state and carried in the state: not again per word, nor per beam."""
    model, feats = make_model(name), regions(4)
    calls = count_calls(model, PER_IMAGE[name])
    generate(model, feats, method="beam", beam_size=3, max_length=9)
    assert calls == {n: [4] for n in PER_IMAGE[name]}
    calls = count_calls(model, PER_IMAGE[name])  # (new hooks: only these are counted from here)
    generate(model, feats, method="greedy", max_length=9)
    model.attention_maps(feats, captions(4))
    assert calls == {n: [4, 4] for n in PER_IMAGE[name]}


@pytest.mark.parametrize("name", NAMES)
def test_scst_samples_of_an_image_share_its_regions_work(name):
    """SCST draws K captions per image from one initial state (draw's copies): the per-image work
    runs on the images, not on their K copies, and the captions are those drawn from K copies of
    the features (float64: the same arithmetic but for the matmuls' batch sizes)."""
    model, feats, k = make_model(name, seed=6), regions(4, seed=6), 3
    uniforms = torch.rand(4 * k, 11, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    calls = count_calls(model, PER_IMAGE[name])
    shared = draw(model, feats, uniforms, max_length=10, copies=k)
    assert calls == {n: [4] for n in PER_IMAGE[name]}
    copied = draw(model, feats.repeat_interleave(k, dim=0), uniforms, max_length=10)
    assert shared.sequences == copied.sequences
    assert shared.scores == pytest.approx(copied.scores, rel=1e-12, abs=1e-12)
    assert len({tuple(s) for s in shared.sequences}) > 1


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("name", NAMES)
def test_batched_beam_matches_the_per_image_reference(name, k):
    model, feats, max_length = make_model(name, seed=k), regions(seed=k + 10), 9
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


@pytest.mark.parametrize("name", NAMES)
def test_beam_one_is_greedy_and_a_batch_is_its_images(name):
    model, feats = make_model(name, seed=5), regions(9, seed=5)
    greedy = generate(model, feats, method="greedy", max_length=10)
    beam = generate(model, feats, method="beam", beam_size=1, max_length=10)
    assert beam.sequences == greedy.sequences
    assert beam.scores == pytest.approx(greedy.scores, rel=1e-12, abs=1e-12)
    assert len({len(s) for s in greedy.sequences}) > 1
    for method in ("greedy", "beam"):
        batch = generate(model, feats, method=method, beam_size=3, max_length=10)
        one_by_one = [generate(model, feats[i : i + 1], method=method, beam_size=3, max_length=10)
                      for i in range(feats.size(0))]
        assert batch.sequences == [o.sequences[0] for o in one_by_one]
        assert batch.scores == pytest.approx([o.scores[0] for o in one_by_one], rel=1e-12, abs=1e-12)
    # SCST's sampling: each image reads its own uniforms, so its samples are its own alone
    uniforms = torch.rand(9, 11, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    batch = draw(model, feats, uniforms, max_length=10)
    for i in range(feats.size(0)):
        alone = draw(model, feats[i : i + 1], uniforms[i : i + 1], max_length=10)
        assert alone.sequences == [batch.sequences[i]]
        assert alone.scores == pytest.approx([batch.scores[i]], rel=1e-12, abs=1e-12)
    assert len({tuple(s) for s in batch.sequences}) > 1


def test_an_ensemble_of_the_three_beam_searches_as_the_per_image_reference():
    """Each member's state, nested in the ensemble's, follows the beam's back-pointers."""
    ensemble = Ensemble([make_model("att2in", seed=1), make_model("updown", seed=2), make_model("aoa", seed=3)])
    feats = regions(seed=4)
    out = generate(ensemble, feats, method="beam", beam_size=3, max_length=9, n_best=3)
    for b in range(feats.size(0)):
        ref = reference_beam(ensemble, feats[b : b + 1], 3, 9)
        assert [ids for ids, _ in out.n_best[b]] == [words for _, words in ref]
        assert [s for _, s in out.n_best[b]] == pytest.approx([s for s, _ in ref], rel=1e-12, abs=1e-12)


# --- each decoder's own arithmetic --------------------------------------------------------------

@torch.no_grad()
def test_att2in_the_context_enters_the_cell_input_only():
    """Rennie et al.'s Att2in: the gates see the word and h, the context only the candidate.
    From the same (h, c) and word, with other regions: the output gate h / tanh(c') and the
    forget gate's share c'(c) - c'(0) are unchanged while the state moves; with the context's
    weights cleared the regions change nothing at all (their attention weights still move)."""
    model, tokens = make_model("att2in"), captions()
    state = model.init_state(regions(seed=1))
    for t in range(3):  # a state with h and c away from zero
        _, state = model.step(tokens[:, t], state)
    h, c = state.h, state.c

    def step(feats, c0):
        fresh = model.init_state(feats)
        return model.step(tokens[:, 3], fresh._replace(h=h, c=c0))[1]

    one, other = regions(seed=7), regions(seed=8)
    a, b = step(one, c), step(other, c)
    assert (a.c - b.c).abs().max() > 1e-3 and (a.attention - b.attention).abs().max() > 1e-3
    torch.testing.assert_close(a.h / torch.tanh(a.c), b.h / torch.tanh(b.c), rtol=1e-9, atol=1e-12)  # sigmoid(o)
    zero = torch.zeros_like(c)
    torch.testing.assert_close(a.c - step(one, zero).c, b.c - step(other, zero).c, rtol=0, atol=1e-12)  # sigmoid(f) c
    # the candidate: the maxout of two units, of the word, h and the context
    sums = model.word_gates(model.embed(tokens[:, 3])) + model.hidden_gates(h)
    context = torch.einsum("br,brd->bd", a.attention, one)
    i = torch.sigmoid(sums[:, :12])
    g1, g2 = (sums[:, 36:] + model.context_cell(context)).chunk(2, dim=1)
    torch.testing.assert_close(step(one, zero).c, i * torch.maximum(g1, g2), rtol=0, atol=1e-12)
    model.context_cell.weight.zero_()
    a, b = step(one, c), step(other, c)
    torch.testing.assert_close(a.h, b.h, rtol=0, atol=0)
    assert (a.attention - b.attention).abs().max() > 1e-3


@torch.no_grad()
def test_att2in_attends_from_the_previous_hidden_state():
    model, feats, tokens = make_model("att2in"), regions(), captions()
    state = model.init_state(feats)
    for t in range(3):
        energy = model.score(torch.tanh(model.region_key(feats) + model.hidden_query(state.h)[:, None])).squeeze(2)
        _, state = model.step(tokens[:, t], state)
        torch.testing.assert_close(state.attention, energy.softmax(dim=1), rtol=0, atol=1e-12)
    assert torch.equal(model.init_state(feats).h, torch.zeros(6, 12, dtype=torch.float64))


@torch.no_grad()
def test_updown_is_two_lstm_cells_around_additive_attention():
    """Anderson et al.'s top-down model, step by step against nn.LSTMCell with the same weights:
    the attention LSTM on [language h; mean region; word], additive attention from its new h, the
    language LSTM on [attended region; attention h], the logits from the language h."""
    model, feats, tokens = make_model("updown"), regions(), captions()
    lang = model.lang_cell
    state = model.init_state(feats)
    for t in range(5):
        logits, after = model.step(tokens[:, t], state)
        x = torch.cat([state.lang_h, feats.mean(dim=1), model.embed(tokens[:, t])], dim=1)
        att_h, att_c = model.att_cell(x, (state.att_h, state.att_c))
        energy = model.score(torch.tanh(model.region_key(feats) + model.hidden_query(att_h)[:, None])).squeeze(2)
        alpha = energy.softmax(dim=1)
        lang_h, lang_c = lang(torch.cat([torch.einsum("br,brd->bd", alpha, feats), att_h], dim=1),
                              (state.lang_h, state.lang_c))
        for got, want in ((after.att_h, att_h), (after.att_c, att_c), (after.attention, alpha),
                          (after.lang_h, lang_h), (after.lang_c, lang_c), (logits, model.output(lang_h))):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        state = after


def _multihead_reference(model: AoA) -> nn.MultiheadAttention:
    """torch's own nn.MultiheadAttention with the AoA decoder's projections (query from h, keys
    and values from the regions A) and no output projection."""
    dim = model.hidden_dim
    mha = nn.MultiheadAttention(dim, model.heads, batch_first=True).double()
    mha.in_proj_weight.copy_(torch.cat([model.query.weight, model.key_value.weight]))
    mha.in_proj_bias.copy_(torch.cat([model.query.bias, model.key_value.bias]))
    mha.out_proj.weight.copy_(torch.eye(dim, dtype=torch.float64))
    mha.out_proj.bias.zero_()
    return mha.eval()


@pytest.mark.parametrize("name", ["aoa", "aoa_refine"])
@torch.no_grad()
def test_aoa_is_an_lstm_multi_head_attention_and_the_gated_information(name):
    """Huang et al.'s decoder step against nn.LSTMCell and nn.MultiheadAttention with the same
    weights: the LSTM on [word; mean of A + c_{t-1}], multi-head attention from its new h over A
    (the weights reported: the mean over heads), c_t = W_i[ctx; h] * sigmoid(W_g[ctx; h]) gives
    the logits and the next step's input."""
    model, feats, tokens = make_model(name), regions(), captions()
    A = model.regions(feats)
    state = model.init_state(feats)
    for t in range(5):
        logits, after = model.step(tokens[:, t], state)
        x = torch.cat([model.embed(tokens[:, t]), A.mean(dim=1) + state.context], dim=1)
        h, c = model.cell(x, (state.h, state.c))
        mha = _multihead_reference(model)
        ctx, weights = mha(h[:, None], A, A, need_weights=True, average_attn_weights=True)
        information, gate = model.aoa(torch.cat([ctx[:, 0], h], dim=1)).chunk(2, dim=1)
        context = information * torch.sigmoid(gate)
        for got, want in ((after.h, h), (after.c, c), (after.attention, weights[:, 0]), (after.context, context),
                          (logits, model.output(context))):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        state = after
    assert model.heads == 3  # several heads: their mean is what sums to 1


@torch.no_grad()
def test_aoa_refiner_blocks_are_self_attention_with_aoa_a_residual_and_layer_norm():
    """The paper's refining block: A' = LayerNorm(A + AoA(f_mh-att(W_Q A, W_K A, W_V A), A)), as
    nn.MultiheadAttention computes the self-attention; the decoder reads the last block's A."""
    model, feats = make_model("aoa_refine"), regions()
    A = torch.relu(model.region_embed(feats))
    for block in model.refiner:
        mha = nn.MultiheadAttention(12, 3, batch_first=True).double().eval()
        mha.in_proj_weight.copy_(block.qkv.weight)
        mha.in_proj_bias.copy_(block.qkv.bias)
        mha.out_proj.weight.copy_(torch.eye(12, dtype=torch.float64))
        mha.out_proj.bias.zero_()
        attended, _ = mha(A, A, A, need_weights=False)
        information, gate = block.aoa(torch.cat([attended, A], dim=-1)).chunk(2, dim=-1)
        A = F.layer_norm(A + information * torch.sigmoid(gate), (12,), block.norm.weight, block.norm.bias)
    torch.testing.assert_close(model.regions(feats), A, rtol=0, atol=1e-12)
    assert not torch.allclose(A, torch.relu(model.region_embed(feats)))
