"""Faults during training: signals, a crash inside a checkpoint write, a loss that turns NaN."""
import signal

import pytest
import torch

from captioner.training import checkpoint
from captioner.training.checkpoint import load_checkpoint, save_checkpoint
from captioner.cli import known_errors
from captioner.runtime import Interrupted
from captioner.data.images import BadImageError
from captioner.objectives.cross_entropy import CrossEntropy
from captioner.training.trainer import train
from conftest import TINY, compose_config
from trainrun import error_lines, one_thread, start, wait_for_step  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg_for(shapes_root, out_dir, *overrides):
    return compose_config("train", [*TINY, f"data.root={shapes_root}", f"train.out_dir={out_dir}",
                                    "train.plot=false", *overrides])


def test_sigint_saves_a_loadable_last_pt_and_exits_130_with_one_line(tmp_path, shapes_root):
    out = tmp_path / "run"
    # long enough (1500 steps) that the signal always lands mid-training
    proc = start(shapes_root, out, "train.batch_size=4", "train.epochs=25", "train.log_every=1")
    wait_for_step(proc, 3)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output
    ckpt = load_checkpoint(out / "last.pt")
    step = ckpt["step"]
    assert step >= 3 and ckpt["epoch"] == 0 and ckpt["batch"] == step
    assert error_lines(output)[-1] == (f"interrupted (SIGINT) at step {step}; saved {out / 'last.pt'}; "
                                       f"resume with train.resume=auto train.out_dir={out}")
    assert not list(out.glob(".*.tmp"))


def test_a_crash_in_the_middle_of_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    good = {"step": 1, "model": {"w": torch.arange(1000.0)}}
    save_checkpoint(path, good)
    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.flush()
        f.truncate(f.tell() // 2)  # half the bytes are on disk ...
        raise OSError(28, "No space left on device")  # ... when the disk fills up

    monkeypatch.setattr(checkpoint.torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"step": 2, "model": {"w": torch.zeros(1000)}})
    monkeypatch.undo()
    again = load_checkpoint(path)
    assert again["step"] == 1 and torch.equal(again["model"]["w"], good["model"]["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_a_kill_during_a_write_leaves_a_temp_file_that_the_next_run_removes(tmp_path, shapes_root):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    train(cfg_for(shapes_root, out, "train.epochs=1"))
    assert not list(out.glob(".*.tmp"))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, shapes_root, monkeypatch):
    original, calls = CrossEntropy.__call__, {"n": 0}

    def loss(self, model, batch):
        out = original(self, model, batch)
        calls["n"] += 1
        if calls["n"] == 5:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(CrossEntropy, "__call__", loss)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError) as info:
        train(cfg_for(shapes_root, out, "train.save_every=2"))
    message = str(info.value)
    assert message.startswith("step 5: training loss became nan; lower optim.lr or check the data")
    assert f"{out / 'last.pt'} keeps step 4, the last good state" in message
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 4
    assert all(bool(torch.isfinite(t).all()) for t in ckpt["model"].values())


def test_known_errors_are_one_line_and_an_exit_code(capsys):
    cases = [
        (FileNotFoundError(2, "No such file or directory", "/data/x.txt"), 1, "error: [Errno 2] No such file or directory: '/data/x.txt'"),
        (BadImageError("2 unreadable image(s) in split 'train':\n  cannot read image a.jpg\n  cannot read image b.jpg"), 1,
         "error: 2 unreadable image(s) in split 'train': cannot read image a.jpg; cannot read image b.jpg"),
        (ValueError("optim.schedule='cosin': choose cosine, step or constant"), 1,
         "error: optim.schedule='cosin': choose cosine, step or constant"),
        (checkpoint.CheckpointError("checkpoint not found: x.pt"), 1, "error: checkpoint not found: x.pt"),
        (FloatingPointError("step 5: training loss became nan"), 1, "error: step 5: training loss became nan"),
        (Interrupted(signal.SIGTERM, "interrupted (SIGTERM) at step 3"), 143, "interrupted (SIGTERM) at step 3"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ]
    for err, code, line in cases:
        with pytest.raises(SystemExit) as exit_info:
            with known_errors():
                raise err
        assert exit_info.value.code == code
        assert capsys.readouterr().err.splitlines() == [line]
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        with known_errors():
            1 / 0
