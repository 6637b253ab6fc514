"""captioner.objectives.rewards.CiderD against pycocoevalcap's CIDEr-D, caption by caption, to 1e-9."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer

from captioner.objectives.rewards import CiderD

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_reward import CorpusDfScorer  # noqa: E402 (the bench's reference: the toolkit with another corpus's df)

FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"
WORDS = [f"w{i}" for i in range(30)]


# ---------------------------------------------------------------------------------------------
# The toolkit's numbers
# ---------------------------------------------------------------------------------------------
def _line(caption, eos=None) -> str:
    words = [str(t) for t in caption] + ([str(eos)] if eos is not None else [])
    return " ".join(words)


def toolkit_scores(corpus, image_ids, candidates, references=None, eos=None) -> np.ndarray:
    """Per-candidate CIDEr-D from pycocoevalcap with the df and ref_len of ``corpus``."""
    df_scorer = CiderScorer()
    for refs in corpus.values():
        df_scorer += (None, [_line(r, eos) for r in refs])
    df_scorer.compute_doc_freq()
    scorer = CorpusDfScorer(df_scorer.document_frequency, np.log(float(len(df_scorer.crefs))))
    references = corpus if references is None else references
    for image_id, caption in zip(image_ids, candidates):
        scorer += (_line(caption, eos), [_line(r, eos) for r in references[image_id]])
    return np.array(scorer.compute_cider())


def toolkit_cider(references, candidates) -> np.ndarray:
    """``Cider().compute_score`` as captioner.evaluation.metrics calls it: one candidate per image, the
    document frequencies from the scored images' references."""
    gts = {i: [_line(r) for r in references[i]] for i in candidates}
    res = {i: [_line(candidates[i])] for i in candidates}
    _, scores = Cider().compute_score(gts, res)
    return np.asarray(scores)


# ---------------------------------------------------------------------------------------------
# Synthetic captions
# ---------------------------------------------------------------------------------------------
def _caption(rng: random.Random, low=0, high=14, words=WORDS) -> list[str]:
    return [rng.choice(words[:12]) if rng.random() < 0.6 else rng.choice(words)
            for _ in range(rng.randint(low, high))]


def _corpus(rng: random.Random, images: int, prefix="img", refs=(3, 6)) -> dict:
    return {f"{prefix}{i}": [_caption(rng, low=1) for _ in range(rng.randint(*refs))] for i in range(images)}


def _awkward(rng: random.Random, refs: dict) -> list[list[str]]:
    longest = max(len(r) for rs in refs.values() for r in rs)
    some_ref = next(iter(refs.values()))[0]
    return [
        [],                                   # empty
        ["w0"],                               # one word
        ["w1"] * 25,                          # one word repeated
        [rng.choice(WORDS) for _ in range(longest + 7)],  # longer than every reference
        ["unseen", "never", "in", "any", "reference"],    # n-grams no reference has
        ["w2", "unseen", "w3", "w2", "unseen"],
        list(some_ref),                       # a reference itself
        list(some_ref) + list(some_ref),      # a reference twice
    ]


def _check(ours, theirs):
    assert ours.dtype == np.float64 and ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------
def test_equals_toolkit_cider_with_the_scored_images_as_corpus():
    rng = random.Random(0)
    refs = _corpus(rng, 40)
    awkward = _awkward(rng, refs)
    candidates = {image_id: (awkward[n] if n < len(awkward) else _caption(rng))
                  for n, image_id in enumerate(refs)}
    ours = CiderD(refs).score(list(candidates), list(candidates.values()))
    _check(ours, toolkit_cider(refs, candidates))
    assert (ours > 0).sum() > 10  # not a test of zeros


def test_many_captions_per_image_in_one_batch():
    rng = random.Random(1)
    refs = _corpus(rng, 20)
    image_ids, candidates = [], []
    for image_id in refs:  # 5 samples + 1 greedy per image, images interleaved
        for _ in range(6):
            image_ids.append(image_id)
            candidates.append(_caption(rng))
    order = rng.sample(range(len(image_ids)), len(image_ids))
    image_ids = [image_ids[i] for i in order]
    candidates = [candidates[i] for i in order]
    candidates[:8] = _awkward(rng, refs)
    cider = CiderD(refs)
    ours = cider.score(image_ids, candidates)
    _check(ours, toolkit_scores(refs, image_ids, candidates))
    # a caption's score does not depend on the rest of the batch
    alone = np.array([cider.score([i], [c])[0] for i, c in zip(image_ids[:12], candidates[:12])])
    np.testing.assert_allclose(alone, ours[:12], rtol=0, atol=1e-12)


def test_training_corpus_df_with_separate_references():
    rng = random.Random(2)
    train = _corpus(rng, 60, prefix="train")
    val = _corpus(rng, 15, prefix="val")
    val["val0"].append(["w1", "zebra", "unicorn", "w2"])  # n-grams the training corpus lacks ...
    image_ids = [image_id for image_id in val for _ in range(3)]
    candidates = [_caption(rng) for _ in image_ids]
    candidates[0] = ["w1", "zebra", "unicorn", "w2", "w3"]  # ... which a candidate shares
    candidates[1:9] = _awkward(rng, val)
    cider = CiderD(train)
    ours = cider.score(image_ids, candidates, references=val)
    _check(ours, toolkit_scores(train, image_ids, candidates, references=val))
    # the df really is the training corpus's, not the scored images'
    assert np.abs(ours - CiderD(val).score(image_ids, candidates)).max() > 1e-3


def test_training_corpus_df_scoring_its_own_images():
    rng = random.Random(3)
    train = _corpus(rng, 80, prefix="train")
    batch = rng.sample(list(train), 16)
    image_ids = [image_id for image_id in batch for _ in range(6)]
    candidates = [_caption(rng) for _ in image_ids]
    candidates[::13] = _awkward(rng, train)
    cider = CiderD(train)
    ours = cider.score(image_ids, candidates)
    _check(ours, toolkit_scores(train, image_ids, candidates))
    # references= with the corpus's own references is the same thing
    np.testing.assert_allclose(cider.score(image_ids, candidates, references=train), ours, rtol=0, atol=1e-12)


def test_integer_ids_score_as_the_same_words():
    rng = random.Random(4)
    refs = _corpus(rng, 25)
    image_ids = [rng.choice(list(refs)) for _ in range(60)]
    candidates = [_caption(rng) for _ in image_ids]
    candidates[:8] = _awkward(rng, refs)
    vocab = {w: i for i, w in enumerate(sorted({w for c in candidates for w in c}
                                               | {w for rs in refs.values() for r in rs for w in r}))}
    as_ids = {k: [[vocab[w] for w in r] for r in rs] for k, rs in refs.items()}
    cand_ids = [np.array([vocab[w] for w in c], dtype=np.int64) for c in candidates]  # arrays too
    by_words = CiderD(refs).score(image_ids, candidates)
    by_ids = CiderD(as_ids).score(image_ids, cand_ids)
    np.testing.assert_allclose(by_ids, by_words, rtol=0, atol=1e-12)
    _check(by_ids, toolkit_scores(refs, image_ids, candidates))
    # and in the separate-references mode
    half = dict(list(as_ids.items())[:10])
    some = [n for n, i in enumerate(image_ids) if i in half]
    np.testing.assert_allclose(
        CiderD(as_ids).score([image_ids[n] for n in some], [cand_ids[n] for n in some], references=half),
        by_words[some], rtol=0, atol=1e-12)


def test_include_eos_appends_the_token_to_both_sides():
    rng = random.Random(5)
    train = _corpus(rng, 30, prefix="train")
    val = _corpus(rng, 8, prefix="val")
    image_ids = [image_id for image_id in train if rng.random() < 0.5 for _ in range(2)]
    candidates = [_caption(rng) for _ in image_ids]
    candidates[:8] = _awkward(rng, train)
    with_eos = CiderD(train, include_eos=True, eos="<eos>")
    ours = with_eos.score(image_ids, candidates)
    _check(ours, toolkit_scores(train, image_ids, candidates, eos="<eos>"))
    assert np.abs(ours - CiderD(train).score(image_ids, candidates)).max() > 1e-3
    # an empty caption is no longer worth 0 when eos matches: the toolkit agrees
    val_ids = [image_id for image_id in val for _ in range(2)]
    val_cands = [_caption(rng) for _ in val_ids]
    val_cands[0] = []
    _check(with_eos.score(val_ids, val_cands, references=val),
           toolkit_scores(train, val_ids, val_cands, references=val, eos="<eos>"))
    # integer captions with an integer eos
    vocab = {w: i + 1 for i, w in enumerate(WORDS + ["unseen", "never", "in", "any", "reference"])}
    train_ids = {k: [[vocab[w] for w in r] for r in rs] for k, rs in train.items()}
    cand_ids = [[vocab[w] for w in c] for c in candidates]
    np.testing.assert_allclose(CiderD(train_ids, include_eos=True, eos=0).score(image_ids, cand_ids),
                               ours, rtol=0, atol=1e-12)


def test_corner_cases_of_the_corpus():
    # one image: N = 1, so every idf is log(1) - log(1) = 0 and every score 0 (as the toolkit)
    one = {"a": [["w1", "w2"], ["w1"]]}
    _check(CiderD(one).score(["a", "a"], [["w1", "w2"], ["w3"]]), toolkit_scores(one, ["a", "a"], [["w1", "w2"], ["w3"]]))
    # single-word references only (no bigrams in the corpus), an empty reference, a repeated one
    refs = {"a": [["w1"], ["w2"], []], "b": [["w3"], ["w3"]], "c": [["w1", "w1", "w1"]]}
    cands = [["w1"], ["w1", "w2"], [], ["w3", "w3"], ["w1", "w1", "w1", "w1"]]
    ids = ["a", "a", "b", "b", "c"]
    _check(CiderD(refs).score(ids, cands), toolkit_scores(refs, ids, cands))
    assert CiderD(refs).score([], []).shape == (0,)
    # references without a single word, in the corpus and passed separately
    blank = {"x": [[]], "y": [[], []]}
    _check(CiderD(blank).score(["x", "y"], [["w1"], []]), toolkit_scores(blank, ["x", "y"], [["w1"], []]))
    _check(CiderD(refs).score(["x", "y"], [["w1"], []], references=blank),
           toolkit_scores(refs, ["x", "y"], [["w1"], []], references=blank))


def test_errors():
    refs = {"a": [["w1"]], "b": [["w2"]]}
    cider = CiderD(refs)
    with pytest.raises(KeyError, match="not in the CiderD corpus"):
        cider.score(["z"], [["w1"]])
    with pytest.raises(KeyError, match="no entry in references"):
        cider.score(["a"], [["w1"]], references={"b": [["w1"]]})
    with pytest.raises(ValueError, match="image ids for"):
        cider.score(["a", "b"], [["w1"]])
    with pytest.raises(TypeError, match="sequence of tokens"):
        cider.score(["a"], ["w1 w2"])
    with pytest.raises(ValueError, match="non-empty list"):
        CiderD({"a": []})
    with pytest.raises(ValueError, match="eos"):
        CiderD(refs, include_eos=True)


@pytest.mark.skipif(not (FLICKR8K / "Flickr8k.token.txt").is_file(), reason="../shared/data/flickr8k absent")
def test_flickr8k_captions():
    captions: dict[str, list[list[str]]] = {}
    for line in (FLICKR8K / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines()[:4000]:
        key, _, caption = line.partition("\t")
        captions.setdefault(key.rpartition("#")[0], []).append(caption.lower().replace(" .", "").split())
    names = list(captions)
    train = {n: captions[n] for n in names[:600]}
    held_out = {n: captions[n][1:] for n in names[600:700]}  # caption 0 is the candidate
    rng = random.Random(6)
    image_ids, candidates = [], []
    for n in list(held_out)[:60]:
        image_ids += [n, n, n]
        candidates += [captions[n][0], captions[rng.choice(names)][0], rng.sample(captions[n][0], len(captions[n][0]))]
    cider = CiderD(train)
    _check(cider.score(image_ids, candidates, references=held_out),
           toolkit_scores(train, image_ids, candidates, references=held_out))
    batch = names[:40]
    cands = {n: captions[rng.choice(names)][2] for n in batch}
    _check(CiderD({n: captions[n] for n in batch}).score(batch, list(cands.values())),
           toolkit_cider({n: captions[n] for n in batch}, cands))


def test_two_step_sort_for_huge_corpora_gives_the_same_scores(monkeypatch):
    from captioner.objectives import rewards

    rng = random.Random(7)
    train, val = _corpus(rng, 40, prefix="train"), _corpus(rng, 6, prefix="val")
    image_ids = [image_id for image_id in train if rng.random() < 0.3 for _ in range(3)]
    candidates = [_caption(rng) for _ in image_ids]
    val_ids = list(val) * 2
    val_cands = [_caption(rng) for _ in val_ids]
    packed = CiderD(train)
    expected = packed.score(image_ids, candidates), packed.score(val_ids, val_cands, references=val)
    monkeypatch.setattr(rewards, "_MAX_KEY", 0)  # as if the keys overflowed int64
    two_step = CiderD(train)
    for ours, theirs in zip((two_step.score(image_ids, candidates),
                             two_step.score(val_ids, val_cands, references=val)), expected):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)


def test_bleu4_is_the_toolkits_per_caption_bleu4():
    from pycocoevalcap.bleu.bleu import Bleu

    from captioner.objectives.rewards import bleu4

    refs = [[["a", "dog", "runs", "on", "the", "grass"], ["a", "brown", "dog", "running"]],
            [["a", "cat", "on", "a", "red", "sofa"], ["the", "cat", "is", "asleep"]],
            [[1, 2, 3, 4, 5]]]
    candidates = [["a", "dog", "running", "on", "the", "grass"], [], [1, 2, 3, 4, 5]]
    got = bleu4(refs, candidates)
    gts = {i: [" ".join(map(str, r)) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(map(str, c))] for i, c in enumerate(candidates)}
    _, per_order = Bleu(4).compute_score(gts, res, verbose=0)
    np.testing.assert_allclose(got, per_order[3], rtol=0, atol=1e-12)
    assert got[2] == pytest.approx(1.0)
