"""Decoding: batched beam search (plain and diverse) against plain one-image-at-a-time
references, and the properties greedy, sampling and beam search promise, with and without a
repetition penalty. Tiny random models, CPU, deterministic."""
from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import pytest
import torch

from captioner.config import DecodeConfig
from captioner.decoding.search import DecodeOutput, generate, penalize_repeats
from captioner.models.base import Decoder
from captioner.models.show_tell import INJECT_MODES, ShowTell
from captioner.data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from trainrun import one_thread  # noqa: F401 (a fixture)

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


# -- diverse beam search ------------------------------------------------------------------------
def reference_repetition(logprobs, words, penalty):
    """``logprobs`` (a list over the vocabulary) with each word's probability divided by
    ``penalty`` per occurrence in ``words`` (special tokens never count), renormalized."""
    lowered = [lp - words.count(w) * math.log(penalty) if w not in (PAD_ID, BOS_ID, EOS_ID, UNK_ID) else lp
               for w, lp in enumerate(logprobs)]
    top = max(lowered)
    total = top + math.log(sum(math.exp(lp - top) for lp in lowered))
    return [lp - total for lp in lowered]


def reference_diverse_beam(model, feature, k, groups, diversity, max_length, length_penalty="none", alpha=0.7,
                           ban_unk=False, block_trigrams=False, repetition_penalty=1.0):
    """The documented rules of ``captioner.decoding.beam_search`` with groups, for one image [1, D]:
    each step every group, in order, runs reference_beam's step on its own W = k / groups
    hypotheses, with its log-probabilities lowered by ``diversity`` per time a group before it
    continued a hypothesis with the word at this step; a hypothesis keeps its search score (with
    those terms) and its own; the image is done when no group can improve its pool.

    Returns every group's finished pool together: [(penalized own score, words)], best first.
    """
    width = k // groups
    state = model.reorder_state(model.init_state(feature), torch.zeros(groups, dtype=torch.long))
    active = [[([], 0.0, 0.0)] for _ in range(groups)]  # per group: (words, search score, own score)
    finished = [[] for _ in range(groups)]  # per group: (penalized search score, penalized own score, words)
    for t in range(max_length + 1):
        hypotheses = [h for group in active for h in group]  # the state's rows, group after group
        tokens = torch.tensor([words[-1] if words else BOS_ID for words, _, _ in hypotheses])
        logprobs, state = model.next_logprobs(tokens, state)
        logprobs = [reference_repetition(row, words, repetition_penalty) if repetition_penalty != 1.0 else row
                    for row, (words, _, _) in zip(logprobs.tolist(), hypotheses)]
        chosen = Counter()  # how often each word continued a hypothesis of the groups before, at this step
        next_active, first = [], 0
        for g in range(groups):
            candidates = []
            for i, (words, score, own) in enumerate(active[g], start=first):
                for w in range(model.vocab_size):
                    if t == max_length and w != EOS_ID:
                        continue
                    if w in (PAD_ID, BOS_ID) or (ban_unk and w == UNK_ID):
                        continue
                    if block_trigrams and w != EOS_ID and repeats_trigram(words, w):
                        continue
                    candidates.append((score + logprobs[i][w] - diversity * chosen[w], own + logprobs[i][w], i, w))
            first += len(active[g])
            candidates.sort(key=lambda c: -c[0])
            group_next = []
            for rank, (score, own, i, w) in enumerate(candidates[: 2 * width]):
                if w == EOS_ID:
                    if rank < width:
                        length = reference_penalty(length_penalty, t + 1, alpha)
                        finished[g].append((score / length, own / length, hypotheses[i][0]))
                elif len(group_next) < width:
                    group_next.append((i, w, score, own))
            finished[g].sort(key=lambda f: -f[0])
            finished[g] = finished[g][:width]
            chosen.update(w for _, w, _, _ in group_next)
            next_active.append(group_next)
        if t == max_length:
            break

        def can_improve(g):
            if not next_active[g]:
                return False
            best = max(score for _, _, score, _ in next_active[g])
            bound = max(best / reference_penalty(length_penalty, t + 2, alpha),
                        best / reference_penalty(length_penalty, max_length + 1, alpha))
            return len(finished[g]) < width or bound > finished[g][-1][0]

        if not any(can_improve(g) for g in range(groups)):
            break
        state = model.reorder_state(state, torch.tensor([i for group in next_active for i, _, _, _ in group]))
        active = [[(hypotheses[i][0] + [w], score, own) for i, w, score, own in group] for group in next_active]
    merged = [(own, words) for pool in finished for _, own, words in pool]
    merged.sort(key=lambda f: -f[0])  # stable: group by group on a tie
    return merged


def test_diverse_beam_with_one_group_is_plain_beam_search():
    """groups=1 is today's beam search to the bit, whatever the diversity (no group before the first)."""
    model, feats = make_model("first_input", seed=20, eos_bias=1.0), features(7, seed=20)
    for penalty in ("none", "gnmt"):
        beam = {"method": "beam", "beam_size": 4, "n_best": 4, "max_length": 10, "length_penalty": penalty}
        plain = generate(model, feats, **beam)
        grouped = generate(model, feats, groups=1, diversity=2.0, **beam)
        assert (grouped.sequences, grouped.scores, grouped.n_best) == (plain.sequences, plain.scores, plain.n_best)


@pytest.mark.parametrize("beam_size,groups", [(6, 3), (4, 2), (3, 3)])
@pytest.mark.parametrize("penalty", ["none", "average"])
def test_diverse_beam_without_diversity_is_a_plain_beam_per_group(beam_size, groups, penalty):
    """With diversity 0 nothing couples the groups: each one is a plain beam of beam_size / groups,
    so the n best of all groups are that beam's pool, once per group."""
    model, feats = make_model("init_state", "gru", seed=beam_size, eos_bias=1.0), features(6, seed=21)
    width, options = beam_size // groups, {"method": "beam", "max_length": 9, "length_penalty": penalty}
    out = generate(model, feats, beam_size=beam_size, n_best=beam_size, groups=groups, diversity=0.0, **options)
    plain = generate(model, feats, beam_size=width, n_best=width, **options)
    for b in range(feats.size(0)):
        one_group = plain.n_best[b] if width > 1 else [(plain.sequences[b], plain.scores[b])]
        assert Counter(tuple(ids) for ids, _ in out.n_best[b]) == Counter({tuple(ids): groups for ids, _ in one_group})
        assert [s for _, s in out.n_best[b]] == pytest.approx(sorted([s for _, s in one_group] * groups, reverse=True),
                                                              rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("beam_size,groups,diversity", [(4, 2, 0.5), (6, 3, 2.0), (3, 3, 1.0), (6, 2, 0.3)])
@pytest.mark.parametrize("options", [{"length_penalty": "none"}, {"length_penalty": "gnmt", "alpha": 1.5},
                                     {"length_penalty": "average", "block_trigrams": True, "ban_unk": True,
                                      "repetition_penalty": 1.7}])
def test_batched_diverse_beam_matches_reference(beam_size, groups, diversity, options):
    model = make_model("first_step_bias", vocab=10, seed=beam_size + groups, eos_bias=0.5, unk_bias=1.0)
    feats = features(6, seed=22)
    out = generate(model, feats, method="beam", beam_size=beam_size, n_best=beam_size, groups=groups,
                   diversity=diversity, max_length=10, **options)
    differs = False  # from plain beam search's pool: the groups did steer each other
    plain = generate(model, feats, method="beam", beam_size=beam_size, n_best=beam_size, max_length=10, **options)
    for b in range(feats.size(0)):
        ref = reference_diverse_beam(model, feats[b : b + 1], beam_size, groups, diversity, 10, **options)
        assert [ids for ids, _ in out.n_best[b]] == [words for _, words in ref]
        assert [s for _, s in out.n_best[b]] == pytest.approx([s for s, _ in ref], rel=1e-5, abs=1e-5)
        assert (out.sequences[b], out.scores[b]) == (ref[0][1], pytest.approx(ref[0][0], rel=1e-5, abs=1e-5))
        differs |= [ids for ids, _ in out.n_best[b]] != [ids for ids, _ in plain.n_best[b]]
    assert differs


def test_ensembles_and_attention_decoders_diverse_beam_search_as_the_reference():
    """Through the decoding protocol alone: an ensemble's nested states and an attention decoder's
    region grids follow the groups' back-pointers, with the repetition penalty too."""
    from captioner.decoding.ensemble import Ensemble
    from test_attention import make_model as attention_model, regions

    ensemble = Ensemble([make_model(seed=25), make_model("init_state", "gru", seed=26)]).eval()
    for model, feats in ((ensemble, features(5, seed=25)), (attention_model(seed=27), regions(5, seed=27))):
        out = generate(model, feats, method="beam", beam_size=4, n_best=4, groups=2, diversity=1.0,
                       repetition_penalty=1.5, max_length=9)
        for b in range(feats.size(0)):
            ref = reference_diverse_beam(model, feats[b : b + 1], 4, 2, 1.0, 9, repetition_penalty=1.5)
            assert [ids for ids, _ in out.n_best[b]] == [words for _, words in ref]
            assert [s for _, s in out.n_best[b]] == pytest.approx([s for s, _ in ref], rel=1e-5, abs=1e-5)


def test_repetition_penalized_beam_matches_reference():
    """One group: the reference is plain beam search under the penalized distribution."""
    model, feats = make_model("first_input", vocab=8, seed=23, eos_bias=-2.0), features(6, seed=23)
    for k in (1, 3):
        out = generate(model, feats, method="beam", beam_size=k, n_best=k, max_length=12, repetition_penalty=3.0)
        for b in range(feats.size(0)):
            ref = reference_diverse_beam(model, feats[b : b + 1], k, 1, 0.0, 12, repetition_penalty=3.0)
            assert out.sequences[b] == ref[0][1]
            assert out.scores[b] == pytest.approx(ref[0][0], rel=1e-12, abs=1e-12)
            if k > 1:
                assert [ids for ids, _ in out.n_best[b]] == [words for _, words in ref]


def distinct_2(n_best):
    """Mean over images of distinct bigrams / all bigrams across the image's n captions."""
    ratios = []
    for captions in n_best:
        bigrams = [tuple(ids[i : i + 2]) for ids, _ in captions for i in range(len(ids) - 1)]
        if bigrams:
            ratios.append(len(set(bigrams)) / len(bigrams))
    return sum(ratios) / len(ratios)


def test_diversity_makes_a_trained_models_n_best_more_diverse(tiny_cfg, one_thread):
    from captioner.evaluate import checkpoint_split
    from captioner.training.trainer import train

    cfg = tiny_cfg("train.epochs=1", "train.plot=false")
    train(cfg)
    model, _, _, _, feats = checkpoint_split(f"{cfg.train.out_dir}/last.pt", "val", device="cpu", progress=False)
    feats = torch.from_numpy(np.asarray(feats, dtype=np.float32))
    beam = {"method": "beam", "beam_size": 6, "n_best": 6, "groups": 3, "max_length": 16}
    same, diverse = (model.generate(feats, diversity=diversity, **beam).n_best for diversity in (0.0, 2.0))
    assert distinct_2(diverse) > distinct_2(same) + 0.05


# -- repetition penalty ------------------------------------------------------------------------
A, B = 4, 5  # the two words of FixedDecoder's vocabulary, after the special tokens


class FixedDecoder(Decoder):
    """The same next-word distribution after any caption: <eos> 0.2, A 0.5, B 0.3 (<unk> 0)."""

    PROBS = (0.0, 0.0, 0.2, 0.0, 0.5, 0.3)

    def __init__(self):
        super().__init__(len(self.PROBS), 1)

    def init_state(self, features):
        return features

    def step(self, tokens, state):
        logits = torch.tensor(self.PROBS, dtype=torch.float64).log().expand(tokens.size(0), -1)
        return logits, state

    @classmethod
    def penalized_score(cls, words, penalty):
        """log p(words, <eos>) under the distribution with the repetition ``penalty``, by hand."""
        logprobs = [math.log(p) if p > 0 else -math.inf for p in cls.PROBS]
        return sum(reference_repetition(logprobs, words[:i], penalty)[w] for i, w in enumerate([*words, EOS_ID]))


def test_penalize_repeats_divides_by_the_penalty_per_occurrence_and_renormalizes():
    probs = torch.tensor([[0.05, 0.05, 0.2, 0.1, 0.4, 0.2]], dtype=torch.float64)
    history = torch.tensor([[A, UNK_ID, A]])  # A twice; <unk> is a special token, never counted
    penalized = penalize_repeats(probs.log(), history, 2.0).exp()
    expected = torch.tensor([[0.05, 0.05, 0.2, 0.1, 0.4 / 4, 0.2]], dtype=torch.float64) / 0.7
    torch.testing.assert_close(penalized, expected, rtol=1e-12, atol=1e-12)
    logprobs = probs.log()
    assert penalize_repeats(logprobs, history, 1.0) is logprobs  # 1: not even renormalized


def test_repetition_penalty_avoids_a_repeated_word_in_greedy_and_beam():
    """By hand, penalty 2: after A, A weighs 0.5 / 2 against B 0.3 and <eos> 0.2 (B: 0.3 / 0.75
    = 0.4 wins over A's 0.25 / 0.75); after A B, A's 0.25 / 0.6 wins; after A B A, <eos>'s
    0.2 / (0.2 + 0.125 + 0.15) does. The score is the caption's log-probability under that."""
    model, feats = FixedDecoder(), torch.zeros(3, 1, dtype=torch.float64)
    assert generate(model, feats, method="greedy", max_length=5).sequences == [[A] * 5] * 3
    expected = math.log(0.5) + math.log(0.3 / 0.75) + math.log(0.25 / 0.6) + math.log(0.2 / 0.475)
    for method in ("greedy", "beam"):
        out = generate(model, feats, method=method, max_length=5, beam_size=1, repetition_penalty=2.0)
        assert out.sequences == [[A, B, A]] * 3, method
        assert out.scores == pytest.approx([expected] * 3, rel=1e-12), method


def test_repetition_penalty_samples_from_the_penalized_distribution():
    """The second word after A, over 4000 seeded draws: A 1/3, B 0.4, <eos> 4/15 (unpenalized:
    0.5, 0.3, 0.2), and each score is the caption's log-probability under that distribution."""
    model, feats = FixedDecoder(), torch.zeros(4000, 1, dtype=torch.float64)
    out = generate(model, feats, method="sample", max_length=2, seed=0, repetition_penalty=2.0)
    after_a = Counter(tuple(seq[1:2]) for seq in out.sequences if seq[:1] == [A])
    total = sum(after_a.values())
    for second, p in (((A,), 1 / 3), ((B,), 0.4), ((), 4 / 15)):
        assert after_a[second] / total == pytest.approx(p, abs=0.04), second
    for seq, score in zip(out.sequences[:50], out.scores[:50]):
        assert score == pytest.approx(FixedDecoder.penalized_score(seq, 2.0), rel=1e-12)


@pytest.mark.parametrize("method", ["greedy", "sample", "beam"])
def test_repetition_penalty_one_is_no_penalty(method):
    model, feats = make_model("first_input", seed=24), features(7, seed=24)
    options = {"method": method, "max_length": 10, "beam_size": 3, "n_best": 3, "seed": 5}
    plain, one = generate(model, feats, **options), generate(model, feats, repetition_penalty=1.0, **options)
    assert (one.sequences, one.scores, one.n_best) == (plain.sequences, plain.scores, plain.n_best)


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


@pytest.mark.parametrize("options, line", [
    ({"groups": 0}, "decode.groups=0: must be at least 1"),
    ({"beam_size": 4, "groups": 3}, "decode.groups=3: must divide decode.beam_size=4"),
    ({"diversity": -1.0}, "decode.diversity=-1.0: must be at least 0.0"),
    ({"repetition_penalty": 0.5}, "decode.repetition_penalty=0.5: must be at least 1.0"),
])
def test_bad_diverse_beam_and_repetition_penalty_values_are_one_line_naming_the_key(options, line):
    with pytest.raises(ValueError) as refused:
        generate(make_model(), features(2), method="beam", **options)
    assert str(refused.value) == line


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
