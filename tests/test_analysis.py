"""The error-analysis page (python -m captioner.evaluate ... html=true): per-image scores by the
toolkit's arithmetic, worst first, references, a filter box, attention strips; it renders."""
import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.evaluate import evaluate_checkpoint
from captioner.evaluation.metrics import image_scores, score_captions
from captioner.training.trainer import train
from conftest import TINY, compose_config
from test_caption import CHROMIUM, loaded_images

needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs chromium (apt-get install chromium)")

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


@pytest.fixture(scope="module")
def attention_page(tmp_path_factory, shapes_root) -> Path:
    """The test page of a one-epoch attention checkpoint (made once for the tests below)."""
    out = tmp_path_factory.mktemp("attention")
    small = ["model=show_attend_tell", "model.embed_dim=16", "model.hidden_dim=24", "model.attention_dim=8",
             "train.epochs=1"]
    cfg = compose_config("train", [*TINY, f"data.root={shapes_root}", f"train.out_dir={out / 'run'}", *small])
    train(cfg)
    evaluate_checkpoint(f"{cfg.train.out_dir}/last.pt", split="test", metrics=("bleu", "cider"), tokenizer="python",
                        output_dir=str(out), device="cpu", progress=False, html=True)
    return out / "errors_test_greedy.html"


def test_the_page_of_an_attention_checkpoint_has_a_strip_per_image(attention_page):
    text = attention_page.read_text()
    assert text.count('<div class="item"') == 12 and text.count('class="strip"') == 12
    assert len(re.findall(r'<img class="strip" src="data:image/jpeg;base64,[A-Za-z0-9+/=]{100,}"', text)) == 12


@needs_chromium
def test_the_page_of_an_attention_checkpoint_renders_with_its_strips(attention_page, tmp_path):
    assert 'data-loaded="24/24"' in loaded_images(attention_page, tmp_path)  # every thumbnail and every strip


COLOURS = {1: (220, 30, 30), 2: (30, 200, 30), 3: (30, 30, 220)}


@pytest.fixture
def three_image_page(tmp_path) -> tuple[Path, dict]:
    """The page of three one-colour images, written from results in another order than the
    records (as an evaluation that kept them in another order would give them)."""
    from captioner.data import ImageRecord
    from captioner.evaluation.analysis import write_error_page

    records = []
    for image_id, colour in COLOURS.items():
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{image_id}.png")
        records.append(ImageRecord(image_id, str(tmp_path / f"{image_id}.png"), REFERENCES[image_id]))
    results = [{"image_id": image_id, "caption": CANDIDATES[image_id]} for image_id in (3, 1, 2)]
    per_image = image_scores(REFERENCES, CANDIDATES, tokenizer="python")
    page = write_error_page(tmp_path / "errors.html", results, records, per_image, {"CIDEr": 0.5}, "three images")
    return page, per_image


def test_each_image_shows_its_own_caption_scores_references_and_thumbnail(three_image_page):
    page, per_image = three_image_page
    items = page.read_text().split('<div class="item"')[1:]
    shown = []
    for item in items:
        cider, bleu, image_id = re.search(r"CIDEr-D ([\d.]+) · BLEU-4 ([\d.]+) · (\d+)</div>", item).groups()
        image_id = int(image_id)
        shown.append(image_id)
        assert re.search(r'<div class="caption">(.*?)</div>', item).group(1) == CANDIDATES[image_id]
        assert re.findall(r"<li>(.*?)</li>", item) == REFERENCES[image_id]
        assert float(cider) == pytest.approx(per_image[image_id]["CIDEr"], abs=5e-4)
        assert float(bleu) == pytest.approx(per_image[image_id]["Bleu_4"], abs=5e-4)
        thumbnail = re.search(r'src="data:image/jpeg;base64,([^"]+)"', item).group(1)
        with Image.open(io.BytesIO(base64.b64decode(thumbnail))) as jpeg:
            assert np.abs(np.asarray(jpeg.convert("RGB"), float) - COLOURS[image_id]).mean() < 8, image_id
    assert sorted(shown) == [1, 2, 3]
    assert shown == sorted(shown, key=lambda i: (per_image[i]["CIDEr"], per_image[i]["Bleu_4"]))  # worst first


@needs_chromium
def test_the_filter_box_keeps_the_images_with_every_word_typed(three_image_page, tmp_path):
    page, _ = three_image_page
    # typed into the box as a person would (an input event each), then the cards left visible
    # counted, with the page's own "N of 3 images" beside them
    typing = """<script>addEventListener('load', () => {
      const box = document.getElementById('filter'), seen = [];
      for (const typed of ['car', 'on', 'Brown  dog', 'dog bike', '']) {
        box.value = typed;
        box.dispatchEvent(new Event('input'));
        const visible = [...document.querySelectorAll('.item')].filter(i => getComputedStyle(i).display !== 'none');
        seen.push(visible.length + '/' + document.getElementById('shown').textContent);
      }
      document.body.setAttribute('data-filtered', seen.join(','));
    });</script>"""
    typed_page = tmp_path / "typed.html"
    typed_page.write_text(page.read_text().replace("</body>", typing + "</body>"))
    dom = loaded_images(typed_page, tmp_path)
    # car: image 3; on: every image; brown dog: a word of image 1's references only; dog bike: none
    assert 'data-filtered="1/1,3/3,1/1,0/0,3/3"' in dom, dom[-2000:]
