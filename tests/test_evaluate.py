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
    from captioner.evaluation.diversity import diversity

    training = [c for r in load_records(cfg.data)["train"] for c in r.captions]
    assert report["diversity"] == diversity([r["caption"] for r in results], training)
    # the data config it records gives captioner.significance the same references again
    from captioner.evaluation.significance import intervals
    from captioner.significance import evaluated_references

    assert evaluated_references(tmp_path / "run" / "results_test_beam.json") == references
    bleu4 = intervals(references, {r["image_id"]: r["caption"] for r in results}, 50, tokenizer="python")[0]
    assert bleu4.score == scores["Bleu_4"] and bleu4.low <= bleu4.score <= bleu4.high


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    from trainrun import ROOT, env

    return subprocess.run([sys.executable, "-m", "captioner.evaluate", *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)


def test_data_keys_without_data_name_change_the_checkpoints_own_data_set(tmp_path):
    from test_caption import untrained_checkpoint

    trained_on = tmp_path / "where it was trained"  # never made: the evaluation reads the images moved
    checkpoint = untrained_checkpoint(tmp_path / "best.pt", f"data.root={trained_on}", "data.num_train=4",
                                      "data.num_val=2", "data.num_test=3", "data.image_size=32", "data.min_count=1")
    moved = tmp_path / "moved"
    proc = _evaluate(f"checkpoint={checkpoint}", f"data.root={moved}", "metrics=[bleu]", "tokenizer=python",
                     "progress=false", "device=cpu", "decode.max_length=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "metrics_test_greedy.json").read_text())
    # the checkpoint's shapes set (3 test images of 32 pixels), not conf/data/shapes.yaml's 250 of 128
    assert report["data"] == "shapes" and report["num_images"] == 3
    assert (moved / "features").is_dir() and not trained_on.exists()


def test_data_keys_without_a_checkpoint_or_misspelled_are_one_line(tmp_path):
    from test_caption import untrained_checkpoint
    from trainrun import assert_one_line_error

    checkpoint = untrained_checkpoint(tmp_path / "best.pt")
    assert_one_line_error(_evaluate(f"checkpoint={checkpoint}", f"data.rot={tmp_path}"),
                          "unknown config key 'data.rot'", "did you mean data.root?")
    assert_one_line_error(_evaluate("results=r.json", "annotations=a.json", f"data.root={tmp_path}"),
                          "data.root=... changes the checkpoint's data set: give checkpoint=PATH")
