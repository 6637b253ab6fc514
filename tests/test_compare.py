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
        _, groups, _ = compare([sweep / "other"], tmp_path / "t")
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


def fake_run(path: Path, rows, job: str = "train", **config) -> Path:
    """A run directory as training leaves it, without training: ``.hydra/config.yaml`` (the
    ``config`` sections), ``.hydra/hydra.yaml`` naming the job, and ``metrics.jsonl`` with
    ``rows`` (a str: the file's text; None: no file)."""
    import yaml

    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (path / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"name": job}}}))
    if rows is not None:
        (path / "metrics.jsonl").write_text(rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n"
                                                                                         for r in rows))
    return path


EPOCHS = [{"epoch": 1, "val/Bleu_4": 0.1, "val/CIDEr": 0.2}, {"epoch": 2, "val/Bleu_4": 0.15, "val/CIDEr": 0.3}]


def test_run_directories_without_a_finished_epoch_are_named_one_line_each(tmp_path, capsys):
    from captioner.compare import main

    fake_run(tmp_path / "done", EPOCHS, train={"seed": 0})
    fake_run(tmp_path / "starting", None, train={"seed": 1})  # killed before its first epoch ended
    fake_run(tmp_path / "empty", "", train={"seed": 2})
    (tmp_path / "copied").mkdir()  # a metrics.jsonl copied without its config
    (tmp_path / "copied" / "metrics.jsonl").write_text(json.dumps(EPOCHS[0]) + "\n")
    fake_run(tmp_path / "features", None, job="extract", train={"seed": 0})  # python -m captioner.extract: no run
    main([str(tmp_path), "--out", str(tmp_path / "t")])
    out, err = capsys.readouterr()
    assert "1 run, 1 setting, 3 run directories left out" in out
    left_out = err.splitlines()
    assert len(left_out) == 3, err
    reasons = {"starting": "no metrics.jsonl", "empty": "metrics.jsonl is empty", "copied": "no .hydra/config.yaml"}
    for line, (name, why) in zip(left_out, sorted(reasons.items())):
        assert line.startswith(f"left out {tmp_path / name}: ") and why in line, line

    with pytest.raises(SystemExit) as stop:  # nothing left to tabulate: the one error line names them
        main([str(tmp_path / "starting"), str(tmp_path / "empty")])
    error = capsys.readouterr().err
    assert stop.value.code == 1 and error.count("\n") == 1 and error.startswith("error: no training runs")
    assert f"{tmp_path / 'starting'} left out: no metrics.jsonl" in error and "metrics.jsonl is empty" in error


def test_a_metrics_line_that_is_not_json_is_one_error_naming_the_file_and_line(tmp_path, capsys):
    from captioner.compare import main

    run = fake_run(tmp_path / "run", json.dumps(EPOCHS[0]) + '\n{"epoch": 2, "val/Bl', train={"seed": 0})
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path), "--out", str(tmp_path / "t")])
    error = capsys.readouterr().err
    assert stop.value.code == 1 and error.count("\n") == 1, error
    assert error.startswith(f"error: {run / 'metrics.jsonl'}, line 2: not JSON"), error


def test_a_figure_some_runs_lack_shows_the_number_of_runs_behind_its_mean():
    from captioner.compare import Run, settings, table

    runs = [Run(Path(f"run{seed}"), {"train.seed": seed}, [], {"val/CIDEr": 0.3, "test_beam/CIDEr": cider})
            for seed, cider in ((0, 0.4), (1, 0.6))]
    runs.append(Run(Path("run2"), {"train.seed": 2}, [], {"val/CIDEr": 0.3}))  # not evaluated on test (yet)
    header, rows = table(settings(runs), ["val/CIDEr", "test_beam/CIDEr"])
    assert header == ["setting", "runs", "val/CIDEr", "test_beam/CIDEr"]
    assert rows == [["(all runs)", "3", "0.3000 ± 0.0000", "0.5000 ± 0.1414 (2 of 3)"]]


def test_scst_runs_started_from_different_checkpoints_are_different_settings():
    from captioner.compare import Run, settings

    def scst(seed, init_from):
        return Run(Path(f"run{seed}"), {"train.seed": seed, "objective.name": "scst", "train.init_from": init_from}, [])

    runs = [scst(0, "ce/seed0/best.pt"), scst(1, "ce/seed0/best.pt"), scst(2, "ce/seed1/best.pt")]
    assert [(s.name, len(s.runs)) for s in settings(runs)] == [
        ("train.init_from=ce/seed0/best.pt", 2), ("train.init_from=ce/seed1/best.pt", 1)]


def test_compare_refuses_a_directory_that_does_not_exist(tmp_path):
    missing = tmp_path / "no such runs"
    proc = subprocess.run([sys.executable, "-m", "captioner.compare", str(missing)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == "", proc
    assert proc.stderr == f"error: {missing}: no such directory\n"


def test_config_values_are_written_into_the_table_escaped(tmp_path, capsys):
    """A value with HTML and a "|" stays in its own cell: the columns keep their numbers, and a
    Markdown renderer that keeps HTML shows the tag rather than running it."""
    from captioner.compare import main

    fake_run(tmp_path / "a", EPOCHS, train={"seed": 0}, model={"name": "<img src=x onerror=alert(1)>|x"})
    fake_run(tmp_path / "b", EPOCHS, train={"seed": 0}, model={"name": "plain"})
    main([str(tmp_path), "--out", str(tmp_path / "t")])
    table = (tmp_path / "t.md").read_text().splitlines()
    columns = table[0].count(" | ")
    assert all(line.replace("\\|", "").count(" | ") == columns for line in table if line.startswith("| "))
    assert "<img" not in "".join(table) and "&lt;img src=x onerror=alert(1)&gt;\\|x" in "".join(table)
    with open(tmp_path / "t.csv", newline="") as f:  # the CSV keeps the value whole, by csv's own quoting
        assert any("<img src=x onerror=alert(1)>|x" in cell for row in csv.reader(f) for cell in row)


def test_a_yaml_alias_bomb_is_left_out_in_one_line(tmp_path, capsys):
    from captioner.compare import main

    fake_run(tmp_path / "good", EPOCHS, train={"seed": 0})
    bomb = fake_run(tmp_path / "bomb", EPOCHS, train={"seed": 1})
    levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]  # 9^9 strings
    (bomb / ".hydra" / "config.yaml").write_text("\n".join(levels) + "\ntrain: {seed: 1}\n")
    main([str(tmp_path), "--out", str(tmp_path / "t")])
    out, err = capsys.readouterr()
    assert "1 run, 1 setting, 1 run directory left out" in out
    assert err.strip() == f"left out {bomb}: {bomb / '.hydra' / 'config.yaml'} uses YAML anchors or aliases, which " \
                          "Hydra never writes"
