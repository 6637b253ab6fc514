"""COCO caption metrics against the coco-caption toolkit's own numbers."""
import json
import math
import shutil
import subprocess

import pytest

from captioner.evaluation import metrics
from captioner.evaluation.metrics import format_scores, score_captions, score_results_file

HAVE_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAVE_JAVA, reason="needs Java")

REFS = {1: ["a dog runs on the green grass", "a brown dog running outside"],
        2: ["a cat sleeps on a red sofa", "the cat is asleep"]}
CANDS = {1: "A dog running on the grass.", 2: "A cat sleeping on a sofa."}


def test_without_java_meteor_is_none_and_the_rest_computes(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name, *a, **k: None)
    with pytest.warns(RuntimeWarning, match="METEOR unavailable"):
        scores = score_captions(REFS, CANDS)  # tokenizer="auto" falls back to the Python tokenizer
    assert scores["METEOR"] is None
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert isinstance(scores[key], float) and 0.0 < scores[key] <= 10.0, key
    assert "METEOR n/a" in format_scores(scores)
    with pytest.raises(RuntimeError, match="java"):
        score_captions(REFS, CANDS, tokenizer="java")


@needs_java
def test_auto_uses_java_and_agrees_with_python(monkeypatch):
    java_calls = []
    java_tokenize = metrics._java_tokenize_lines
    monkeypatch.setattr(metrics, "_java_tokenize_lines", lambda lines: java_calls.append(len(lines)) or
                        java_tokenize(lines))
    auto = score_captions(REFS, CANDS, metrics=("bleu", "rouge", "cider"))
    assert java_calls, "tokenizer=auto did not run the Java tokenizer although Java is installed"
    monkeypatch.setattr(metrics, "_java_tokenize_lines", lambda lines: pytest.fail("python must not use Java"))
    python = score_captions(REFS, CANDS, metrics=("bleu", "rouge", "cider"), tokenizer="python")
    assert auto == python


def test_candidate_ids_must_be_reference_ids():
    with pytest.raises(ValueError, match="subset"):
        score_captions(REFS, {1: "a dog", 3: "a horse"}, metrics=("bleu",))
    with pytest.raises(ValueError):
        score_captions(REFS, {}, metrics=("bleu",))
    with pytest.raises(ValueError, match="non-empty"):
        score_captions({1: []}, {1: "a dog"}, metrics=("bleu",))
    with pytest.raises(ValueError, match="unknown metric"):
        score_captions(REFS, CANDS, metrics=("bleu", "wer"))


def test_only_candidate_images_are_scored():
    # CIDEr-D document frequencies come from the scored images' references only: adding
    # reference-only images must not change anything.
    more = {**REFS, 3: ["a horse in a field"], 4: ["a dog on the grass"]}
    assert score_captions(more, CANDS, metrics=("bleu", "cider"), tokenizer="python") == \
        score_captions(REFS, CANDS, metrics=("bleu", "cider"), tokenizer="python")


def test_training_path_is_quiet_and_starts_no_java(monkeypatch, capsys):
    def no_subprocess(*args, **kwargs):
        raise AssertionError("started a subprocess")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    scores = score_captions(REFS, CANDS, metrics=("bleu",), tokenizer="python")
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "bleu_counts"}
    assert capsys.readouterr().out == ""  # pycocoevalcap's Bleu prints its counts; not here


def test_bleu_identical_caption_is_one():
    caption = "a man riding a wave on top of a surfboard"
    scores = score_captions({7: [caption]}, {7: caption.upper() + "."}, metrics=("bleu",), tokenizer="python")
    for n in range(1, 5):
        assert scores[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)


def test_bleu_uses_the_closest_reference_length():
    # 5 candidate words; references of 3 and 6 words: the closest is 6, so the brevity penalty
    # applies (ratio 5/6) although a shorter reference exists.
    scores = score_captions({1: ["a b c", "a b c d e f"]}, {1: "a b c d e"}, metrics=("bleu",), tokenizer="python")
    assert scores["bleu_counts"]["reflen"] == 6
    assert scores["bleu_counts"]["testlen"] == 5
    assert scores["Bleu_1"] == pytest.approx(math.exp(1 - 6 / 5), abs=1e-6)
    # A tie (4 and 6 words for 5) goes to the shorter reference: no brevity penalty.
    scores = score_captions({1: ["a b c d", "a b c d e f"]}, {1: "a b c d e"}, metrics=("bleu",), tokenizer="python")
    assert scores["bleu_counts"]["reflen"] == 4
    assert scores["Bleu_1"] == pytest.approx(1.0, abs=1e-6)


def test_format_scores_names_the_scale():
    line = format_scores({"Bleu_1": 0.5794, "Bleu_4": 0.19083, "METEOR": None, "CIDEr": 0.5998,
                          "bleu_counts": {"reflen": 1}})
    assert line == "scores on the 0-1 scale: Bleu_1 0.579 | Bleu_4 0.191 | METEOR n/a | CIDEr 0.600"


def test_results_file_checks(tmp_path):
    annotations = {"images": [{"id": 1}, {"id": 2}],
                   "annotations": [{"image_id": i, "id": 10 * i + k, "caption": c}
                                   for i, caps in REFS.items() for k, c in enumerate(caps)]}
    ann_path = tmp_path / "ann.json"
    ann_path.write_text(json.dumps(annotations))

    def results(items):
        path = tmp_path / "res.json"
        path.write_text(json.dumps(items))
        return path

    scores = score_results_file(results([{"image_id": 2, "caption": CANDS[2]}]), ann_path,
                                metrics=("bleu",), tokenizer="python")
    assert scores == score_captions({2: REFS[2]}, {2: CANDS[2]}, metrics=("bleu",), tokenizer="python")
    with pytest.raises(ValueError, match="more than one caption"):
        score_results_file(results([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}]),
                           ann_path, metrics=("bleu",), tokenizer="python")
    with pytest.raises(ValueError, match="no references"):
        score_results_file(results([{"image_id": 5, "caption": "a"}]), ann_path, metrics=("bleu",),
                           tokenizer="python")


def test_spice_reported_unavailable_without_its_models(monkeypatch):
    monkeypatch.setattr(metrics, "_spice_models_present", lambda: False)
    with pytest.warns(RuntimeWarning, match="SPICE unavailable"):
        scores = score_captions(REFS, CANDS, metrics=("bleu", "spice"), tokenizer="python")
    assert scores["SPICE"] is None
    assert "Bleu_4" in scores
