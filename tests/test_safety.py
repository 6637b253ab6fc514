"""Safe loading: a checkpoint is data, never code; one that does not fit the run says so in one line."""
import os
import pickle

import pytest
import torch

from captioner.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from captioner.training.restore import restore_model
from captioner.training.trainer import train
from conftest import TINY, compose_config
from trainrun import assert_one_line_error, one_thread, run  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this runs ``touch <marker>``: what a booby-trapped checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_checkpoint(path, marker, protocol=2):
    # a real-looking checkpoint with the payload tucked in among plain data
    state = {"model": {"w": torch.zeros(2)}, "step": 1, "config": {"note": Payload(marker)}}
    torch.save(state, path, pickle_protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_pickled_object_in_a_checkpoint_is_refused_and_never_run(tmp_path, protocol):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    malicious_checkpoint(path, marker, protocol)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "refusing to load" in message and "nothing in it was run" in message
    if protocol == 2:  # torch names the blocked callable (with protocol 4 it stops at an unknown opcode)
        assert "posix.system" in message
    assert "\n" not in message and "weights_only` set to `False`" not in message  # no advice to load it unsafely
    with pytest.raises(CheckpointError):
        restore_model(path)
    assert not marker.exists()


def test_a_plain_pickle_file_is_refused_too(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": Payload(marker)}, f)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_truncated_checkpoint_is_one_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.arange(10000.0)}})
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*last.pt"):
        load_checkpoint(path)


def test_resuming_from_a_malicious_checkpoint_from_the_command_line(tmp_path, shapes_root):
    marker, path = tmp_path / "pwned", tmp_path / "ckpt" / "last.pt"
    path.parent.mkdir()
    malicious_checkpoint(path, marker)
    proc = run(shapes_root, tmp_path / "run", f"train.resume={path}")
    assert_one_line_error(proc, "refusing to load", str(path), "nothing in it was run")
    assert not marker.exists()


@pytest.fixture
def trained(tmp_path, shapes_root):
    """A finished one-epoch run and the config it was trained with."""
    cfg = compose_config("train", [*TINY, f"data.root={shapes_root}", f"train.out_dir={tmp_path / 'run'}",
                                   "train.epochs=1", "train.plot=false"])
    train(cfg)
    return tmp_path / "run", cfg


def test_a_checkpoint_from_another_vocabulary_is_one_line_from_the_command_line(tmp_path, shapes_root, trained):
    out, _ = trained
    ckpt = load_checkpoint(out / "last.pt")
    words = ckpt["vocab"]["itos"]
    ckpt["vocab"]["itos"] = [*words[:10], "zebra", *words[11:]]  # as if built from other captions
    other = tmp_path / "other" / "last.pt"
    save_checkpoint(other, ckpt)
    proc = run(shapes_root, tmp_path / "run2", f"train.resume={other}", "train.epochs=2")
    line = assert_one_line_error(proc, str(other), "another vocabulary", f"word 10 is 'zebra' there, {words[10]!r} here")
    assert line.startswith("error: ")


def test_a_checkpoint_of_another_model_shape_or_feature_size_is_refused(tmp_path, shapes_root, trained):
    out, _ = trained
    cfg = compose_config("train", [*TINY, f"data.root={shapes_root}", f"train.out_dir={out}", "train.epochs=2",
                                   "train.plot=false", "train.resume=auto", "model.hidden_dim=40"])
    with pytest.raises(CheckpointError, match=r"another model shape \(model.hidden_dim=48 there, 40 here\)"):
        train(cfg)
    ckpt = load_checkpoint(out / "last.pt")
    ckpt["feature_dim"] = 2048
    save_checkpoint(out / "last.pt", ckpt)
    cfg = compose_config("train", [*TINY, f"data.root={shapes_root}", f"train.out_dir={out}", "train.epochs=2",
                                   "train.plot=false", "train.resume=auto"])
    with pytest.raises(CheckpointError, match=r"trained on 2048-d features .* this config gives 1280-d"):
        train(cfg)


def test_resume_from_a_missing_path_is_one_line(tmp_path, shapes_root):
    cfg = compose_config("train", [*TINY, f"data.root={shapes_root}", f"train.out_dir={tmp_path / 'run'}",
                                   f"train.resume={tmp_path / 'nope.pt'}"])
    with pytest.raises(CheckpointError, match=r"train.resume=.*nope.pt: no such checkpoint file"):
        train(cfg)
