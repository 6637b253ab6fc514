"""Decoding: batched beam search against a plain one-image-at-a-time reference, and the
properties greedy, sampling and beam search promise. Tiny random models, CPU, deterministic."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from captioner.config import DecodeConfig
from captioner.decoding.search import DecodeOutput, generate
from captioner.models.show_tell import INJECT_MODES, ShowTell
from captioner.data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID

VOCAB, FEATURE = 14, 10


def make_model(inject="first_input", cell="lstm", vocab=VOCAB, seed=0, scale=0.6, eos_bias=0.0,
               unk_bias=0.0, layers=1) -> ShowTell:
    """A random float64 decoder with peaked next-token distributions, so captions end at
    different lengths and beams disagree (default init gives near-uniform distributions)."""
    torch.manual_seed(seed)
    model = ShowTell(vocab, FEATURE, embed_dim=8, hidden_dim=12, num_layers=layers, dropout=0.0,
                     cell=cell, inject=inject).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)
        model.output.weight.mul_(3.0)
        model.output.bias[EOS_ID] += eos_bias
        model.output.bias[UNK_ID] += unk_bias
    return model.eval()


def features(n=7, seed=1) -> torch.Tensor:
    return torch.randn(n, FEATURE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- the reference: one image at a time, plain Python lists -------------------------------------
def reference_penalty(kind, length, alpha):
    if kind == "none":
        return 1.0
    if kind == "average":
        return float(length)
    return ((5.0 + length) / 6.0) ** alpha


def repeats_trigram(words, w):
    if len(words) < 3:
        return False
    new = (words[-2], words[-1], w)
    return any(tuple(words[i : i + 3]) == new for i in range(len(words) - 2))


def reference_beam(model, feature, k, max_length, penalty="none", alpha=0.7, ban_unk=False, block_trigrams=False):
    """The documented rules of ``captioner.decoding.beam_search``, for one image [1, D].

    Returns the finished pool: [(penalized score, words)], best first, at most k.
    """
    state = model.init_state(feature)
    active = [([], 0.0)]  # (words, raw score); the state has one row per active hypothesis
    finished = []
    for t in range(max_length + 1):
        tokens = torch.tensor([words[-1] if words else BOS_ID for words, _ in active])
        logprobs, state = model.next_logprobs(tokens, state)
        logprobs = logprobs.tolist()
        candidates = []
        for i, (words, score) in enumerate(active):
            for w in range(model.vocab_size):
                if t == max_length and w != EOS_ID:
                    continue
                if w in (PAD_ID, BOS_ID) or (ban_unk and w == UNK_ID):
                    continue
                if block_trigrams and w != EOS_ID and repeats_trigram(words, w):
                    continue
                candidates.append((score + logprobs[i][w], i, w))
        candidates.sort(key=lambda c: -c[0])
        next_active = []
        for rank, (score, i, w) in enumerate(candidates[: 2 * k]):
            if w == EOS_ID:
                if rank < k:  # an <eos> ranked below k would not have made the beam
                    finished.append((score / reference_penalty(penalty, t + 1, alpha), active[i][0]))
            elif len(next_active) < k:
                next_active.append((i, w, score))
        finished.sort(key=lambda f: -f[0])  # stable: on a tie the earlier one stays first
        finished = finished[:k]
        if t == max_length or not next_active:
            break
        best = max(score for _, _, score in next_active)
        bound = max(best / reference_penalty(penalty, t + 2, alpha),
                    best / reference_penalty(penalty, max_length + 1, alpha))
        if len(finished) == k and bound <= finished[-1][0]:
            break
        state = model.reorder_state(state, torch.tensor([i for i, _, _ in next_active]))
        active = [(active[i][0] + [w], score) for i, w, score in next_active]
    return finished


# -- batched beam == reference --------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("penalty", ["none", "average", "gnmt"])
@pytest.mark.parametrize("inject,cell", [("first_input", "lstm"), ("init_state", "gru"), ("first_step_bias", "lstm")])
def test_batched_beam_matches_reference(k, penalty, inject, cell):
    model = make_model(inject, cell, seed=k, eos_bias=1.0)
    feats = features(6, seed=k + 10)
    max_length = 9
    out = generate(model, feats, method="beam", beam_size=k, max_length=max_length, length_penalty=penalty,
                   alpha=0.9, n_best=k)
    n_best = out.n_best or [[(seq, score)] for seq, score in zip(out.sequences, out.scores)]  # k=1: None
    lengths = set()
    for b in range(feats.size(0)):
        ref = reference_beam(model, feats[b : b + 1], k, max_length, penalty, alpha=0.9)
        assert out.sequences[b] == ref[0][1]
        # the same sequences exactly; scores to rounding (a GEMM's last bits depend on batch size)
        assert out.scores[b] == pytest.approx(ref[0][0], rel=1e-12, abs=1e-12)
        assert [ids for ids, _ in n_best[b]] == [words for _, words in ref]
        assert [s for _, s in n_best[b]] == pytest.approx([s for s, _ in ref], rel=1e-12, abs=1e-12)
        lengths |= {len(ids) for ids, _ in n_best[b]}
    if k > 1:  # the comparison saw hypotheses finish at different lengths
        assert len(lengths) > 1


@pytest.mark.parametrize("penalty", ["average", "gnmt"])
def test_beam_stops_only_when_the_pool_cannot_be_beaten(penalty):
    """<eos>-happy models fill the pool with short captions early; a longer caption found later
    can still win under a length penalty. Stopping on the common heuristic bound
    ``score / penalty(words + 1)`` instead of the best over every reachable length changes the
    results of this test (checked for both penalties; GNMT needs a large alpha to show it)."""
    for k in (3, 5):
        model = make_model("first_input", seed=k, eos_bias=3.0)
        feats = features(6, seed=k + 10)
        out = generate(model, feats, method="beam", beam_size=k, max_length=16, length_penalty=penalty,
                       alpha=2.0, n_best=k)
        for b in range(feats.size(0)):
            ref = reference_beam(model, feats[b : b + 1], k, 16, penalty, alpha=2.0)
            assert [ids for ids, _ in out.n_best[b]] == [words for _, words in ref]
            assert [s for _, s in out.n_best[b]] == pytest.approx([s for s, _ in ref], rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("layers,cell", [(2, "lstm"), (1, "rnn")])
def test_batched_beam_matches_reference_with_constraints(layers, cell):
    model = make_model("first_step_bias", cell, vocab=8, seed=3, unk_bias=1.5, layers=layers)
    feats = features(5, seed=4)
    out = generate(model, feats, method="beam", beam_size=3, max_length=12, n_best=3,
                   ban_unk=True, block_trigrams=True, length_penalty="gnmt")
    for b in range(feats.size(0)):
        ref = reference_beam(model, feats[b : b + 1], 3, 12, "gnmt", ban_unk=True, block_trigrams=True)
        assert [ids for ids, _ in out.n_best[b]] == [words for _, words in ref]
        assert [s for _, s in out.n_best[b]] == pytest.approx([s for s, _ in ref], rel=1e-12, abs=1e-12)


# -- method properties -------------------------------------------------------------------------
@pytest.mark.parametrize("inject", INJECT_MODES)
def test_beam_size_one_is_greedy(inject):
    model, feats = make_model(inject, seed=5), features(9, seed=5)
    greedy = generate(model, feats, method="greedy", max_length=10)
    beam = generate(model, feats, method="beam", beam_size=1, max_length=10)
    assert beam.sequences == greedy.sequences
    assert beam.scores == pytest.approx(greedy.scores, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("inject", INJECT_MODES)
def test_sampling_top_k_one_and_tiny_top_p_are_greedy(inject):
    model, feats = make_model(inject, seed=6), features(9, seed=6)
    greedy = generate(model, feats, method="greedy", max_length=10)
    for options in ({"top_k": 1}, {"top_p": 1e-9}, {"top_k": 1, "temperature": 5.0}):
        sampled = generate(model, feats, method="sample", max_length=10, seed=123, **options)
        assert sampled.sequences == greedy.sequences, options
        assert sampled.scores == pytest.approx(greedy.scores, rel=1e-12, abs=1e-12)


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    model, feats = make_model("init_state", "lstm", seed=7, scale=0.3), features(8, seed=7)
    before = torch.get_rng_state()
    a = generate(model, feats, method="sample", max_length=12, seed=1)
    b = generate(model, feats, method="sample", max_length=12, seed=1)
    c = generate(model, feats, method="sample", max_length=12, seed=2)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched
    assert a.sequences == b.sequences and a.scores == b.scores
    assert a.sequences != c.sequences
    # a filter changes what can be drawn, and the score stays the model's log-probability
    hot = generate(model, feats, method="sample", max_length=12, seed=1, temperature=3.0, top_k=3, top_p=0.9)
    assert all(math.isfinite(s) and s < 0 for s in hot.scores)


def test_n_best_sorted_distinct_and_consistent():
    model, feats = make_model("first_input", seed=8), features(6, seed=8)
    for penalty in ("none", "average", "gnmt"):
        out = generate(model, feats, method="beam", beam_size=5, n_best=4, max_length=10, length_penalty=penalty)
        assert isinstance(out, DecodeOutput) and len(out.n_best) == 6
        for seq, score, n_best in zip(out.sequences, out.scores, out.n_best):
            assert len(n_best) == 4
            scores = [s for _, s in n_best]
            assert scores == sorted(scores, reverse=True)
            assert len({tuple(ids) for ids, _ in n_best}) == 4
            assert (seq, score) == tuple(n_best[0])
    assert generate(model, feats, method="beam", beam_size=3, n_best=1).n_best is None


def test_scores_are_caption_log_probabilities():
    """Score = sum of log p over the words and the closing <eos>, by teacher forcing."""
    model, feats = make_model("first_step_bias", seed=9), features(5, seed=9)
    for method in ("greedy", "beam"):
        out = generate(model, feats, method=method, max_length=8, beam_size=3)
        for b, (seq, score) in enumerate(zip(out.sequences, out.scores)):
            tokens = torch.tensor([[BOS_ID, *seq, EOS_ID]])
            logprobs = model(feats[b : b + 1], tokens).log_softmax(-1)[0]
            expected = logprobs.gather(1, tokens[:, 1:].T).sum().item()
            assert score == pytest.approx(expected, rel=1e-9)


def has_repeated_trigram(seq):
    trigrams = [tuple(seq[i : i + 3]) for i in range(len(seq) - 2)]
    return len(trigrams) != len(set(trigrams))


def test_block_trigrams():
    # 4 words and long captions: without blocking, repeats are all but certain
    model, feats = make_model("first_input", vocab=8, seed=10, eos_bias=-6.0), features(8, seed=10)
    plain = generate(model, feats, method="beam", beam_size=3, n_best=3, max_length=25)
    assert any(has_repeated_trigram(ids) for image in plain.n_best for ids, _ in image)
    for method in ("greedy", "sample", "beam"):
        out = generate(model, feats, method=method, beam_size=3, n_best=3, max_length=25, block_trigrams=True)
        lists = out.n_best or [[(s, 0.0)] for s in out.sequences]
        for image in lists:
            for ids, _ in image:
                assert not has_repeated_trigram(ids), (method, ids)


def test_ban_unk_and_no_special_tokens():
    model, feats = make_model("init_state", "gru", seed=11, unk_bias=4.0), features(8, seed=11)
    for method in ("greedy", "sample", "beam"):
        plain = generate(model, feats, method=method, beam_size=3, n_best=3, max_length=10)
        assert any(UNK_ID in seq for seq in plain.sequences)  # the model loves <unk>
        out = generate(model, feats, method=method, beam_size=3, n_best=3, max_length=10, ban_unk=True)
        lists = out.n_best or [[(s, 0.0)] for s in out.sequences]
        for image in lists:
            for ids, _ in image:
                assert UNK_ID not in ids
                assert not {PAD_ID, BOS_ID, EOS_ID} & set(ids)


def test_max_length_closes_every_caption():
    model, feats = make_model("first_input", seed=12, eos_bias=-20.0), features(4, seed=12)
    for method in ("greedy", "sample", "beam"):
        out = generate(model, feats, method=method, max_length=6, beam_size=2)
        assert all(len(seq) == 6 for seq in out.sequences), method  # <eos> is never chosen before


def test_float32_and_config_options():
    """generate takes the decode config's fields as engine.decode_features passes them."""
    model = ShowTell(40, FEATURE, embed_dim=16, hidden_dim=16, inject="first_input").eval()
    feats = features(4).float()
    options = {k: v for k, v in dataclasses.asdict(DecodeConfig()).items() if k not in ("method", "batch_size")}
    for method in ("greedy", "sample", "beam"):
        out = model.generate(feats, method=method, **{**options, "n_best": 2, "beam_size": 3})
        assert len(out.sequences) == 4 and len(out.scores) == 4
        assert (out.n_best is not None) == (method == "beam")
    with pytest.raises(TypeError, match="beam_sise"):
        generate(model, feats, method="beam", beam_sise=3)
    with pytest.raises(ValueError, match="decode.method"):
        generate(model, feats, method="nucleus")
    with pytest.raises(ValueError, match="decode.n_best"):
        generate(model, feats, method="beam", beam_size=2, n_best=3)
    with pytest.raises(ValueError, match="decode.length_penalty"):
        generate(model, feats, method="beam", length_penalty="wu")
    with pytest.raises(ValueError, match="decode.temperature"):
        generate(model, feats, method="sample", temperature=0.0)


@pytest.mark.parametrize("group", ["greedy", "sample", "beam"])
def test_every_decode_config_decodes_through_the_engine(group):
    """conf/decode/*.yaml compose with the real schema and run through the one evaluation path."""
    import numpy as np

    from captioner.decoding.captioner import decode_features
    from captioner.data.vocab import SPECIALS, Vocabulary
    from conftest import compose_config

    cfg = compose_config("train", [f"decode={group}", "decode.max_length=5", "decode.n_best=2", "decode.batch_size=3"])
    vocab = Vocabulary([*SPECIALS, *(f"w{i}" for i in range(VOCAB - len(SPECIALS)))])
    model = make_model("first_input", seed=13).float()
    items = decode_features(model, np.random.default_rng(0).normal(size=(5, FEATURE)).astype(np.float32), vocab,
                            cfg.decode, "cpu")
    assert [item["row"] for item in items] == list(range(5))
    assert all(len(item["caption"].split()) <= 5 for item in items)
    assert all(("n_best" in item) == (group == "beam") for item in items)
