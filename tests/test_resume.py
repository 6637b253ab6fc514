"""Exact resume: a run stopped anywhere (SIGINT, SIGKILL) and resumed with train.resume=auto ends
with the same weights, optimizer state and metrics as a run that was never stopped."""
import json
import random
import signal
from pathlib import Path

import pytest
import torch

from captioner.training.checkpoint import load_checkpoint, save_checkpoint
from captioner.training.rng import rng_state, set_rng_state
from captioner.runtime import Interrupted
from captioner.objectives.cross_entropy import CrossEntropy
from captioner.training.trainer import train
from conftest import TINY, compose_config
from trainrun import load, one_thread, run, start, wait_for_step  # noqa: F401 (fixture)

# 240 (image, caption) pairs in batches of 16: 15 steps per epoch, 30 in all; dropout on.
RUN = ["train.batch_size=16", "train.epochs=2", "train.plot=false", "model.dropout=0.3"]


def cfg_for(shapes_root, out_dir, *overrides):
    return compose_config("train", [*TINY, f"data.root={shapes_root}", f"train.out_dir={out_dir}", *RUN, *overrides])


def rows(out_dir):
    """metrics.jsonl without the wall-clock times."""
    lines = Path(out_dir, "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in lines]


def assert_same_state(a: dict, b: dict):
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        for key in opt_a[i]:
            assert torch.equal(torch.as_tensor(opt_a[i][key]), torch.as_tensor(opt_b[i][key])), (i, key)
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    assert a["best_metric"] == b["best_metric"]


def interrupt_at(monkeypatch, step: int, signum=signal.SIGINT):
    """Deliver ``signum`` to this process during training step ``step`` (1-based)."""
    original, calls = CrossEntropy.__call__, {"n": 0}

    def loss(self, model, batch):
        calls["n"] += 1
        if calls["n"] == step:
            signal.raise_signal(signum)
        return original(self, model, batch)

    monkeypatch.setattr(CrossEntropy, "__call__", loss)


def test_sigint_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, shapes_root, monkeypatch, one_thread):
    reference = train(cfg_for(shapes_root, tmp_path / "ref"))

    interrupt_at(monkeypatch, 7)
    with pytest.raises(Interrupted, match=r"interrupted \(SIGINT\) at step 7; saved .*last.pt; resume with "
                                          r"train.resume=auto") as info:
        train(cfg_for(shapes_root, tmp_path / "run"))
    assert info.value.exit_code == 130
    stopped = load_checkpoint(tmp_path / "run" / "last.pt")
    assert (stopped["step"], stopped["epoch"], stopped["batch"]) == (7, 0, 7)
    assert rows(tmp_path / "run") == []
    monkeypatch.undo()

    final = train(cfg_for(shapes_root, tmp_path / "run", "train.resume=auto"))
    assert {k: v for k, v in final.items() if k != "time_s"} == {k: v for k, v in reference.items() if k != "time_s"}
    assert rows(tmp_path / "run") == rows(tmp_path / "ref")
    assert_same_state(load(tmp_path / "ref" / "last.pt"), load(tmp_path / "run" / "last.pt"))
    assert_same_state(load(tmp_path / "ref" / "best.pt"), load(tmp_path / "run" / "best.pt"))


def test_sigterm_at_an_epoch_boundary_then_resume_by_path(tmp_path, shapes_root, monkeypatch, one_thread):
    train(cfg_for(shapes_root, tmp_path / "ref"))
    interrupt_at(monkeypatch, 15, signal.SIGTERM)  # the last step of epoch 1, before its evaluation
    with pytest.raises(Interrupted, match=r"\(SIGTERM\) at step 15") as info:
        train(cfg_for(shapes_root, tmp_path / "run"))
    assert info.value.exit_code == 143
    monkeypatch.undo()
    stopped = load_checkpoint(tmp_path / "run" / "last.pt")
    assert (stopped["step"], stopped["epoch"], stopped["batch"]) == (15, 0, 15)
    assert rows(tmp_path / "run") == []
    # a run directory is enough for train.resume: it evaluates epoch 1, then trains epoch 2
    train(cfg_for(shapes_root, tmp_path / "run", f"train.resume={tmp_path / 'run'}"))
    assert rows(tmp_path / "run") == rows(tmp_path / "ref")
    assert_same_state(load(tmp_path / "ref" / "last.pt"), load(tmp_path / "run" / "last.pt"))


def test_resume_drops_metrics_rows_the_checkpoint_does_not_have(tmp_path, shapes_root, one_thread):
    out = tmp_path / "run"
    train(cfg_for(shapes_root, out, "train.epochs=1"))
    ckpt = load_checkpoint(out / "last.pt")
    # as if killed after writing metrics.jsonl for an epoch but before its checkpoint landed
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "step": 30}) + "\n" + '{"epoch": 3, "st')
    train(cfg_for(shapes_root, out, "train.resume=auto"))
    assert [r["epoch"] for r in rows(out)] == [1, 2]
    assert load_checkpoint(out / "last.pt")["history"][0] == ckpt["history"][0]


def test_resume_auto_without_checkpoint_starts_fresh_and_finished_run_is_a_no_op(tmp_path, shapes_root, one_thread):
    out = tmp_path / "run"
    first = train(cfg_for(shapes_root, out, "train.resume=auto", "train.epochs=1"))
    assert first["epoch"] == 1
    before = load(out / "last.pt")
    again = train(cfg_for(shapes_root, out, "train.resume=auto", "train.epochs=1"))
    assert again == first
    assert_same_state(before, load(out / "last.pt"))


def test_rng_state_round_trips_as_plain_data(tmp_path):
    import numpy as np

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    np.random.normal()  # a cached Gaussian in NumPy's state
    state = rng_state()
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    expected = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])  # weights_only=True load
    got = (random.random(), np.random.normal(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(tmp_path, shapes_root, one_thread):
    """The real thing: `python -m captioner.train` killed with SIGKILL (no chance to clean up,
    possibly in the middle of writing a checkpoint) and resumed with train.resume=auto. The
    uninterrupted reference runs in this process (one thread, like the subprocesses)."""
    overrides = [*RUN, "train.log_every=1"]
    kill_step = random.Random(20240611).randint(3, 27)  # fixed seed: the same "random" step every run
    train(cfg_for(shapes_root, tmp_path / "ref"))

    proc = start(shapes_root, tmp_path / "run", *overrides, "train.save_every=1")
    seen, _ = wait_for_step(proc, kill_step)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    stopped = load(tmp_path / "run" / "last.pt")
    assert seen - 1 <= stopped["step"] <= 30, (seen, stopped["step"])

    resumed = run(shapes_root, tmp_path / "run", *overrides, "train.save_every=1", "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'run' / 'last.pt'}: step {stopped['step']}" in resumed.stdout
    assert_same_state(load(tmp_path / "ref" / "last.pt"), load(tmp_path / "run" / "last.pt"))
    assert rows(tmp_path / "run") == rows(tmp_path / "ref")
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_weight_average_resumes_exactly(tmp_path, shapes_root, monkeypatch, one_thread):
    """With optim.ema_decay, checkpoints hold the average as "model" (what evaluate decodes) and
    the trained weights beside it; a resumed run continues both."""
    reference = train(cfg_for(shapes_root, tmp_path / "ref", "optim.ema_decay=0.9"))
    interrupt_at(monkeypatch, 20)
    with pytest.raises(Interrupted):
        train(cfg_for(shapes_root, tmp_path / "run", "optim.ema_decay=0.9"))
    monkeypatch.undo()
    final = train(cfg_for(shapes_root, tmp_path / "run", "optim.ema_decay=0.9", "train.resume=auto"))
    assert {k: v for k, v in final.items() if k != "time_s"} == {k: v for k, v in reference.items() if k != "time_s"}
    ref, run_ = load(tmp_path / "ref" / "last.pt"), load(tmp_path / "run" / "last.pt")
    assert_same_state(ref, run_)
    assert ref["ema_updates"] == run_["ema_updates"] == 30
    for name, weight in ref["trained_model"].items():
        assert torch.equal(weight, run_["trained_model"][name]), name
    assert not torch.equal(ref["model"]["output.weight"], ref["trained_model"]["output.weight"])
