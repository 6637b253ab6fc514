"""Paired significance and caption diversity: the fast resampled scores against the toolkit's on
the same resample, the tests' behaviour on known answers, and the diversity counts by hand."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from captioner.evaluation.diversity import diversity
from captioner.evaluation.metrics import score_captions
from captioner.evaluation.significance import CorpusStatistics, draw_copies, intervals, paired_test

pytestmark = pytest.mark.usefixtures("one_thread")
from trainrun import env, one_thread  # noqa: E402,F401 (fixture)

WORDS = ("a man dog woman red blue ball park runs sits on the in with of grass street two people small "
         "large white black playing riding bike water near").split()


def _caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS[: rng.randint(8, len(WORDS))]) for _ in range(rng.randint(3, 11)))


@pytest.fixture(scope="module")
def corpus():
    """40 images with 5 references each; A copies a reference on some images, B is noise."""
    rng = random.Random(0)
    references = {i: [_caption(rng) for _ in range(5)] for i in range(40)}
    first = {i: refs[0] if i % 3 == 0 else _caption(rng) for i, refs in references.items()}
    second = {i: _caption(rng) for i in references}
    return references, first, second


def _toolkit_on(copies, references, captions) -> dict:
    """The toolkit's scores on a file holding each image ``copies[i]`` times, each copy under an id
    of its own."""
    ids = list(captions)
    refs = {(image, c): references[image] for k, image in enumerate(ids) for c in range(copies[k])}
    return score_captions(refs, {key: captions[key[0]] for key in refs}, ("bleu", "rouge", "cider"), "python")


def test_the_resampled_scores_are_the_toolkits_on_that_resample(corpus):
    references, first, second = corpus
    stats = CorpusStatistics(references, [first, second], "python")
    copies = draw_copies(len(first), 3, seed=0)
    assert (copies.sum(axis=1) == len(first)).all() and (copies == 0).any()  # drawn with replacement
    fast = stats.corpus(copies)
    for b in range(len(copies)):
        for system, captions in enumerate((first, second)):
            toolkit = _toolkit_on(copies[b], references, captions)
            for metric in ("Bleu_4", "ROUGE_L", "CIDEr"):
                assert fast[system][metric][b] == pytest.approx(toolkit[metric], abs=1e-9), (b, system, metric)


def test_the_identity_resample_gives_the_toolkits_corpus_scores(corpus):
    references, first, second = corpus
    stats = CorpusStatistics(references, [first, second], "python")
    fast = stats.corpus(np.ones((1, len(first)), dtype=np.int64))
    for system, captions in enumerate((first, second)):
        toolkit = score_captions(references, captions, ("bleu", "rouge", "cider"), "python")
        assert fast[system]["Bleu_4"][0] == toolkit["Bleu_4"]  # pooled integer counts: bit for bit
        for metric in ("ROUGE_L", "CIDEr"):  # a mean in another order: the last bit may differ
            assert fast[system][metric][0] == pytest.approx(toolkit[metric], rel=1e-12)
        assert {m: stats.observed[system][m] for m in ("Bleu_4", "ROUGE_L", "CIDEr")} == \
            {m: toolkit[m] for m in ("Bleu_4", "ROUGE_L", "CIDEr")}  # what the tables report: the toolkit's own


def test_identical_captions_differ_by_zero_with_p_one(corpus):
    references, first, _ = corpus
    for row in paired_test(references, first, dict(first), resamples=200, tokenizer="python"):
        assert (row.difference, row.low, row.high, row.p_bootstrap, row.p_randomization) == (0, 0, 0, 1, 1), row


def test_a_planted_difference_is_found(corpus):
    """B is A with a reference as the caption of half the images: better everywhere, p < 0.01."""
    references, _, noise = corpus
    planted = {i: references[i][0] if i % 2 == 0 else caption for i, caption in noise.items()}
    for row in paired_test(references, planted, noise, resamples=500, tokenizer="python"):
        assert row.difference > 0 and row.low > 0, row
        assert row.p_bootstrap < 0.01 and row.p_randomization < 0.01, row


def test_the_randomization_test_swaps_captions_image_by_image(corpus):
    references, first, second = corpus
    stats = CorpusStatistics(references, [first, second], "python")
    swaps = np.random.default_rng(0).random((2, len(first))) < 0.5
    differences = stats.swapped(swaps)
    for t, swap in enumerate(swaps):
        a = {i: second[i] if s else first[i] for i, s in zip(first, swap)}
        b = {i: first[i] if s else second[i] for i, s in zip(first, swap)}
        ta, tb = (score_captions(references, c, ("bleu", "rouge", "cider"), "python") for c in (a, b))
        for metric in ("Bleu_4", "ROUGE_L", "CIDEr"):
            assert differences[metric][t] == pytest.approx(ta[metric] - tb[metric], abs=1e-12), metric


def test_one_run_gets_intervals_around_its_scores(corpus):
    references, first, _ = corpus
    for row in intervals(references, first, resamples=300, tokenizer="python"):
        assert row.low < row.score < row.high, row


def test_captions_of_other_images_are_refused(corpus):
    references, first, second = corpus
    with pytest.raises(ValueError, match="not of the same images"):
        CorpusStatistics(references, [first, {k: v for k, v in second.items() if k != 3}], "python")


def test_diversity_counts_by_hand():
    captions = ["A dog runs.", "a dog runs", "a cat sits on a mat", "two dogs"]
    training = ["a cat sits on a mat", "a bird flies"]
    got = diversity(captions, training)
    # words: a dog runs | a dog runs | a cat sits on a mat | two dogs -> 14 words, 9 distinct
    # (a dog runs cat sits on mat two dogs)
    # bigrams: 2 + 2 + 5 + 1 = 10; distinct: (a dog) (dog runs) (a cat) (cat sits) (sits on) (on a) (a mat) (two dogs) = 8
    assert got == {"vocabulary": 9.0, "distinct_1": 9 / 14, "distinct_2": 8 / 10, "in_training": 1 / 4,
                   "shared": 2 / 4, "mean_length": 14 / 4}


def _write(path, payload) -> str:
    path.write_text(json.dumps(payload))
    return str(path)


def test_the_command_prints_the_paired_table(corpus, tmp_path):
    references, first, second = corpus
    annotations = _write(tmp_path / "captions.json", {
        "images": [{"id": i} for i in references],
        "annotations": [{"image_id": i, "caption": c} for i, refs in references.items() for c in refs]})
    a = _write(tmp_path / "a.json", [{"image_id": i, "caption": c} for i, c in first.items()])
    b = _write(tmp_path / "b.json", [{"image_id": i, "caption": c} for i, c in second.items()])
    proc = subprocess.run([sys.executable, "-m", "captioner.significance", a, b, "--annotations", annotations,
                           "--resamples", "200", "--tokenizer", "python"], env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cider = next(line for line in proc.stdout.splitlines() if line.startswith("| CIDEr"))
    expected = paired_test(references, first, second, resamples=200, tokenizer="python")[2]
    assert f"| {expected.first:.4f} | {expected.second:.4f} | {expected.difference:+.4f} |" in cider
    proc = subprocess.run([sys.executable, "-m", "captioner.significance", a, str(tmp_path / "missing.json"),
                           "--annotations", annotations], env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "missing.json" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_evaluated_run_is_compared_against_the_references_it_was_scored_on(tmp_path):
    """A run directory's results file and the data config in the metrics file beside it."""
    from captioner.data.shapes import load_shapes
    from captioner.significance import main

    records = load_shapes(str(tmp_path / "data"), 4, 2, 12, 32)["test"]
    data = {"name": "shapes", "root": str(tmp_path / "data"), "num_train": 4, "num_val": 2, "num_test": 12,
            "image_size": 32}
    for run, pick in (("a", 0), ("b", 1)):
        (tmp_path / run).mkdir()
        _write(tmp_path / run / "results_test_beam.json",
               [{"image_id": r.image_id, "caption": r.captions[pick if r.image_id % 2 else 0]} for r in records])
        _write(tmp_path / run / "metrics_test_beam.json", {"split": "test", "data_config": data, "scores": {}})
    main([str(tmp_path / "a"), str(tmp_path / "b"), "--resamples", "50", "--tokenizer", "python"])
    references = {r.image_id: list(r.captions) for r in records}
    a = {r.image_id: r.captions[0] for r in records}
    b = {r.image_id: r.captions[1 if r.image_id % 2 else 0] for r in records}
    assert paired_test(references, a, b, resamples=50, tokenizer="python")[0].difference != 0
