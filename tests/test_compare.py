"""Sweeps (Hydra multirun of training) and python -m captioner.compare over their run directories."""
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from captioner.compare import compare
from conftest import TINY
from test_caption import CHROMIUM, loaded_images
from trainrun import ROOT, env

FAST = [*TINY, "train.plot=false"]


def best(run_dir: Path, metric: str = "val/Bleu_4") -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(rows, key=lambda r: r[metric])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, shapes_root):
    """A two-job multirun (seeds 0 and 1) and a single run of another setting."""
    root = tmp_path_factory.mktemp("sweep")
    base = [sys.executable, "-m", "captioner.train"]
    args = [*FAST, f"data.root={shapes_root}"]
    multirun = subprocess.run([*base, "-m", *args, "train.seed=0,1", f"hydra.sweep.dir={root / 'sweep'}"], cwd=ROOT,
                              env=env(), capture_output=True, text=True, timeout=300)
    assert multirun.returncode == 0, multirun.stderr[-3000:]
    single = subprocess.run([*base, *args, "model.inject=every_step", f"train.out_dir={root / 'other'}"], cwd=ROOT,
                            env=env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    return root


def test_a_multirun_gives_each_job_its_own_run_directory(sweep):
    jobs = sorted(p.name for p in (sweep / "sweep").iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job, seed in (("0", 0), ("1", 1)):
        overrides = (sweep / "sweep" / job / ".hydra" / "overrides.yaml").read_text()
        assert f"train.seed={seed}" in overrides
        assert (sweep / "sweep" / job / "last.pt").is_file() and not (sweep / "sweep" / job / ".lock").exists()


def test_compare_prints_a_row_per_setting_with_means_over_seeds(sweep, tmp_path, capsys):
    from captioner.compare import main

    main([str(sweep / "sweep"), str(sweep / "other"), "--out", str(tmp_path / "table"), "--figures", "all"])
    printed = capsys.readouterr().out
    assert "3 runs, 2 settings" in printed
    with open(tmp_path / "table.csv", newline="") as f:
        rows = {r["setting"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"model.inject=first_input", "model.inject=every_step"}
    seeds = [best(sweep / "sweep" / job) for job in ("0", "1")]
    first = rows["model.inject=first_input"]
    assert first["runs"] == "2"
    mean, std = (float(x) for x in first["val/Bleu_1"].split(" ± "))
    values = [r["val/Bleu_1"] for r in seeds]
    assert mean == pytest.approx(statistics.fmean(values), abs=5e-5)
    assert std == pytest.approx(statistics.stdev(values), abs=5e-5)
    other = rows["model.inject=every_step"]
    assert other["runs"] == "1" and float(other["val/Bleu_1"]) == pytest.approx(best(sweep / "other")["val/Bleu_1"],
                                                                                abs=5e-5)
    assert (tmp_path / "table.md").read_text().count("\n") == 4  # header, rule, two rows
    assert (tmp_path / "table.png").stat().st_size > 1000


def test_evaluate_scores_in_a_run_directory_join_its_row(sweep, tmp_path):
    (sweep / "other" / "metrics_test_beam.json").write_text(json.dumps(
        {"split": "test", "num_images": 12, "scores": {"Bleu_4": 0.25, "CIDEr": 0.5, "bleu_counts": {"reflen": 9}}}))
    try:
        _, groups = compare([sweep / "other"], tmp_path / "t")
        assert groups[0].stats("test_beam/CIDEr") == (0.5, None)
        assert set(groups[0].runs[0].figures) >= {"test_beam/Bleu_4", "test_beam/CIDEr"}
        assert not any("num_images" in f or "reflen" in f for f in groups[0].runs[0].figures)
    finally:
        (sweep / "other" / "metrics_test_beam.json").unlink()


def test_a_run_made_before_an_option_existed_joins_the_row_of_its_setting():
    from captioner.compare import Run, settings

    def run(seed, **config):
        return Run(Path(f"run{seed}"), {"train.seed": seed, "model.inject": "every_step", **config}, [])

    older = run(0)  # before encoder.precision was an option
    newer = [run(1, **{"encoder.precision": "fp32"}), run(2, **{"encoder.precision": "fp32"})]
    assert [(s.name, len(s.runs)) for s in settings([older, *newer])] == [("(all runs)", 3)]

    bf16 = run(3, **{"encoder.precision": "bf16"})  # where the runs that have it differ, it names rows
    assert [(s.name, len(s.runs)) for s in settings([older, *newer, bf16])] == [
        ("encoder.precision unset", 1), ("encoder.precision=fp32", 2), ("encoder.precision=bf16", 1)]


def test_compare_names_a_directory_without_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "captioner.compare", str(tmp_path)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "no training runs" in proc.stderr


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs chromium (apt-get install chromium)")
def test_the_comparison_png_renders_in_headless_chromium(sweep, tmp_path):
    compare([sweep / "sweep"], tmp_path / "t")
    page = tmp_path / "page.html"
    page.write_text('<html><body><img src="t.png"></body></html>')
    assert 'data-loaded="1/1"' in loaded_images(page, tmp_path)


def test_the_same_sweep_resumes_job_by_job_and_refuses_one_out_dir(sweep, shapes_root):
    before = [(sweep / "sweep" / job / "metrics.jsonl").read_text() for job in ("0", "1")]
    args = [sys.executable, "-m", "captioner.train", "-m", *FAST, f"data.root={shapes_root}", "train.seed=0,1",
            f"hydra.sweep.dir={sweep / 'sweep'}"]
    again = subprocess.run([*args, "train.resume=auto"], cwd=ROOT, env=env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    for job, text in zip(("0", "1"), before):
        assert "resumed from" in (sweep / "sweep" / job / "train.log").read_text()
        assert (sweep / "sweep" / job / "metrics.jsonl").read_text() == text  # finished: nothing retrained
    one_dir = subprocess.run([*args, f"train.out_dir={sweep / 'one'}"], cwd=ROOT, env=env(), capture_output=True,
                             text=True, timeout=300)
    assert one_dir.returncode == 1 and "train.out_dir names one directory for every job" in one_dir.stderr
