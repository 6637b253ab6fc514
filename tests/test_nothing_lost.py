"""What is never lost and what is never trusted: finished runs, users' folders, file names, and
files that came from someone else."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from captioner.training.rundir import RunExistsError
from captioner.training.trainer import train
from conftest import TINY, compose_config
from trainrun import assert_one_line_error, one_thread, run  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["train.epochs=1", "train.plot=false", "train.tensorboard=false"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (its path relative to it) and the hash of its bytes."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_fresh_run_on_a_finished_run_changes_nothing_and_says_how_to_go_on(shapes_root, tmp_path):
    finished = run(shapes_root, tmp_path / "run", *FAST, f"train.out_dir={tmp_path / 'run'}")
    assert finished.returncode == 0, finished.stderr[-2000:]
    before = snapshot(tmp_path / "run")
    assert {"last.pt", "best.pt", "metrics.jsonl", ".hydra/config.yaml", "train.log"} <= set(before)
    again = run(shapes_root, tmp_path / "run", "train.epochs=2", "train.plot=false", f"train.out_dir={tmp_path / 'run'}")
    assert_one_line_error(again, f"train.out_dir={tmp_path / 'run'} holds a run (last.pt)", "train.resume=auto",
                          "train.overwrite=true")
    assert snapshot(tmp_path / "run") == before  # Hydra's log and config included: refused before it started


def test_overwrite_moves_the_old_run_aside_whole(shapes_root, tmp_path):
    out = tmp_path / "run"
    assert run(shapes_root, out, *FAST, f"train.out_dir={out}").returncode == 0
    before = snapshot(out)
    again = run(shapes_root, out, *FAST, f"train.out_dir={out}", "train.overwrite=true", "train.seed=1")
    assert again.returncode == 0, again.stderr[-2000:]
    (aside,) = out.glob("replaced-*")
    assert snapshot(aside) == before  # every file of the old run, byte for byte
    assert (out / "best.pt").is_file() and (out / ".hydra" / "config.yaml").is_file()


def test_the_library_refuses_the_same_way(tiny_cfg, tmp_path):
    cfg = tiny_cfg(*FAST)
    train(cfg)
    before = snapshot(Path(cfg.train.out_dir))
    with pytest.raises(RunExistsError, match="holds a run"):
        train(tiny_cfg(*FAST))
    assert snapshot(Path(cfg.train.out_dir)) == before
    assert train(tiny_cfg(*FAST, "train.resume=auto"))["epoch"] == 1  # going on with it is allowed
