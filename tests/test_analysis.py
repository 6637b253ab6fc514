"""The error-analysis page (python -m captioner.evaluate ... html=true): per-image scores by the
toolkit's arithmetic, worst first, references, a filter box, attention strips; it renders."""
import re
from pathlib import Path

import numpy as np
import pytest

from captioner.evaluate import evaluate_checkpoint
from captioner.evaluation.metrics import image_scores, score_captions
from captioner.training.trainer import train
from test_caption import CHROMIUM, loaded_images

REFERENCES = {1: ["a dog runs on the grass", "a brown dog running"], 2: ["two people ride bikes", "cyclists on a road"],
              3: ["a red car parked", "a car on the street"]}
CANDIDATES = {1: "a dog runs on grass", 2: "a man rides a bike", 3: "a blue car on a street"}


def test_per_image_cider_averages_to_the_corpus_cider_and_bleu_is_the_sentence_bleu():
    per_image = image_scores(REFERENCES, CANDIDATES, tokenizer="python")
    corpus = score_captions(REFERENCES, CANDIDATES, metrics=("bleu", "cider"), tokenizer="python")
    assert np.mean([s["CIDEr"] for s in per_image.values()]) == pytest.approx(corpus["CIDEr"], abs=1e-12)
    for image_id in CANDIDATES:
        alone = score_captions({image_id: REFERENCES[image_id]}, {image_id: CANDIDATES[image_id]}, metrics=("bleu",),
                               tokenizer="python")
        assert per_image[image_id]["Bleu_4"] == pytest.approx(alone["Bleu_4"], abs=1e-12)


def _page(tiny_cfg, tmp_path, *overrides) -> tuple[Path, dict]:
    cfg = tiny_cfg(*overrides)
    train(cfg)
    scores = evaluate_checkpoint(f"{cfg.train.out_dir}/last.pt", split="test", metrics=("bleu", "cider"),
                                 tokenizer="python", output_dir=str(tmp_path), device="cpu", progress=False, html=True)
    return tmp_path / "errors_test_greedy.html", scores


def test_the_page_lists_every_image_worst_first_with_its_references(tiny_cfg, tmp_path):
    page, scores = _page(tiny_cfg, tmp_path)
    text = page.read_text()
    ciders = [float(v) for v in re.findall(r"CIDEr-D ([\d.]+) ·", text)]
    assert len(ciders) == 12  # data.num_test
    assert ciders == sorted(ciders)
    assert np.mean(ciders) == pytest.approx(scores["CIDEr"], abs=1e-3)  # (shown to 3 decimals)
    assert text.count('<ol class="refs">') == 12 and 'id="filter"' in text
    assert f"CIDEr <b>{scores['CIDEr']:.3f}</b>" in text
    results = (tmp_path / "results_test_greedy.json").read_text()
    assert '"attention"' not in results  # the COCO results file stays the COCO format


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs chromium (apt-get install chromium)")
def test_the_page_of_an_attention_checkpoint_renders_with_its_strips(tiny_cfg, tmp_path):
    small = ["model=show_attend_tell", "model.embed_dim=16", "model.hidden_dim=24", "model.attention_dim=8",
             "train.epochs=1"]
    page, _ = _page(tiny_cfg, tmp_path, *small)
    text = page.read_text()
    assert text.count('class="strip"') == 12
    assert 'data-loaded="24/24"' in loaded_images(page, tmp_path)  # every thumbnail and every strip
