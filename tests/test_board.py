"""TensorBoard logging (train.tensorboard): the event files hold what the run logged, and a run
without the package trains the same."""
import json
import logging
import sys

import pytest
import torch

from captioner.training.checkpoint import load_checkpoint
from captioner.training.trainer import train
from conftest import TINY, compose_config
from trainrun import one_thread  # noqa: F401 (fixture)

pytest.importorskip("tensorboard")  # the dev extra installs it


def events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_event_files_hold_the_steps_the_epochs_and_captions(tiny_cfg, tmp_path, one_thread):
    final = train(tiny_cfg("train.log_every=0"))
    run_dir = tmp_path / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    board = events(run_dir)
    tags = board.Tags()["scalars"]
    steps = board.Scalars("train/step_loss")
    assert [s.step for s in steps] == list(range(1, final["step"] + 1))
    assert len(board.Scalars("lr")) == final["step"]
    for metric in ("val/Bleu_4", "val/CIDEr", "train/loss"):
        assert metric in tags
        logged = board.Scalars(metric)
        assert [s.step for s in logged] == [r["step"] for r in rows]
        assert [s.value for s in logged] == pytest.approx([r[metric] for r in rows], rel=1e-6)
    text = board.Tensors("val/captions/text_summary")
    assert len(text) == len(rows)
    assert b"**" in text[-1].tensor_proto.string_val[0]  # image id, its caption, then its references


def test_without_the_package_training_is_unchanged_and_says_so_once(shapes_root, tmp_path, monkeypatch, caplog,
                                                                    one_thread):
    def cfg(out, *overrides):
        return compose_config("train", [*TINY, f"data.root={shapes_root}", f"train.out_dir={tmp_path / out}",
                                        *overrides])

    with_board = train(cfg("with"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with caplog.at_level(logging.INFO, logger="captioner.training.board"):
        without = train(cfg("without"))
    assert not (tmp_path / "without" / "tensorboard").exists()
    assert [r.getMessage() for r in caplog.records if r.name == "captioner.training.board"] == [
        "TensorBoard logging off: the tensorboard package is not installed (pip install tensorboard)"]
    drop = {"time_s"}
    assert {k: v for k, v in without.items() if k not in drop} == {k: v for k, v in with_board.items() if k not in drop}
    a, b = load_checkpoint(tmp_path / "with" / "last.pt"), load_checkpoint(tmp_path / "without" / "last.pt")
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name

    with pytest.raises(ValueError, match="train.tensorboard=true needs the tensorboard package"):
        train(cfg("required", "train.tensorboard=true"))
    assert not (tmp_path / "required" / "metrics.jsonl").exists()  # refused before any data work


def test_a_resumed_run_drops_the_events_logged_after_its_checkpoint(tiny_cfg, tmp_path, monkeypatch, one_thread):
    """A run that dies at step 7 with last.pt at step 4 has logged steps 5 and 6 already; resumed,
    it drops them (purge_step) and logs them again, so every step shows once."""
    from captioner.objectives.cross_entropy import CrossEntropy

    original, calls = CrossEntropy.__call__, {"n": 0}

    def dies_at_seven(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("killed")
        return original(self, model, batch)

    with monkeypatch.context() as patch:
        patch.setattr(CrossEntropy, "__call__", dies_at_seven)
        with pytest.raises(RuntimeError, match="killed"):
            train(tiny_cfg("train.log_every=0", "train.save_every=4"))
    run_dir = tmp_path / "run"
    assert load_checkpoint(run_dir / "last.pt")["step"] == 4
    assert [s.step for s in events(run_dir).Scalars("train/step_loss")] == [1, 2, 3, 4, 5, 6]
    final = train(tiny_cfg("train.log_every=0", "train.save_every=4", "train.resume=auto"))
    assert [s.step for s in events(run_dir).Scalars("train/step_loss")] == list(range(1, final["step"] + 1))
