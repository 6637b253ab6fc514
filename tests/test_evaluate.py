"""python -m captioner.evaluate: the toolkit's demo scored exactly, and checkpoints evaluated."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from captioner.evaluate import run
from conftest import SHARED_DATA, compose_config

COCO = SHARED_DATA / "coco-caption"
needs_coco = pytest.mark.skipif(not (COCO / "captions_val2014.json").exists(), reason="../shared/data absent")
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Java not installed")


def _score(tokenizer, metrics):
    cfg = compose_config("evaluate", [f"results={COCO / 'captions_val2014_fakecap_results.json'}",
                                      f"annotations={COCO / 'captions_val2014.json'}",
                                      f"tokenizer={tokenizer}", f"metrics=[{','.join(metrics)}]"])
    return run(cfg)


def _java_children():
    """Java processes started by this test process; empty where /proc is absent."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid() and b"java" in (stat.parent / "cmdline").read_bytes():
                found.append(stat.parent.name)
        except (OSError, IndexError, ValueError):
            continue
    return found


@needs_coco
@pytest.mark.parametrize("tokenizer,metrics", [
    ("python", ["bleu", "rouge", "cider"]),
    # the toolkit's own pipeline: Java PTB tokenizer, and METEOR 1.5 in Java
    pytest.param("java", ["bleu", "meteor", "rouge", "cider"], marks=needs_java),
])
def test_toolkit_demo_scores_match_exactly(tokenizer, metrics):
    expected = json.loads((COCO / "expected_scores.json").read_text())
    scores = _score(tokenizer, metrics)
    keys = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"] + (["METEOR"] if "meteor" in metrics else [])
    for key in keys:
        assert scores[key] == pytest.approx(expected[key], abs=1e-6), key
    assert scores["bleu_counts"] == expected["bleu_counts"]
    assert _java_children() == []  # the METEOR process is closed, not left to the garbage collector


@needs_coco
def test_cli_prints_scores_on_named_scale():
    out = subprocess.run([sys.executable, "-m", "captioner.evaluate",
                          f"results={COCO / 'captions_val2014_fakecap_results.json'}",
                          f"annotations={COCO / 'captions_val2014.json'}", "tokenizer=python", "metrics=[bleu]"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "0-1 scale" in out.stdout and "Bleu_4 0.1908" in out.stdout


def test_evaluates_a_checkpoint_and_writes_results(tiny_cfg, tmp_path):
    from captioner.training.trainer import train

    cfg = tiny_cfg("train.epochs=1")
    train(cfg)
    ev = compose_config("evaluate", [f"checkpoint={cfg.train.out_dir}/last.pt", "split=test", "decode=beam",
                                     "decode.beam_size=2", "metrics=[bleu,rouge,cider]", "tokenizer=python",
                                     "progress=false"])
    scores = run(ev)
    results = json.loads((tmp_path / "run" / "results_test_beam.json").read_text())
    assert len(results) == cfg.data.num_test and {"image_id", "caption"} <= set(results[0])
    # the scores are those of the captions written, against the test split's references
    from captioner.data import load_records
    from captioner.evaluation.metrics import score_captions

    references = {r.image_id: r.captions for r in load_records(cfg.data)["test"]}
    again = score_captions(references, {r["image_id"]: r["caption"] for r in results},
                           metrics=("bleu", "rouge", "cider"), tokenizer="python")
    assert {k: scores[k] for k in ("Bleu_4", "ROUGE_L", "CIDEr")} == {k: again[k] for k in ("Bleu_4", "ROUGE_L", "CIDEr")}
    report = json.loads((tmp_path / "run" / "metrics_test_beam.json").read_text())
    assert report["scale"] == "0-1" and report["scores"]["Bleu_4"] == scores["Bleu_4"]
