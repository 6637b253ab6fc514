"""The four commands in one shape: every user-fixable failure is one line, exit status 1, no
traceback, and finished work is never lost. Checked through the commands as a user runs them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from captioner.training.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from captioner.cli import check_config
from captioner.encoding.encoders import ENCODER_DIMS
from captioner.models import build_model
from captioner.data.vocab import SPECIALS, Vocabulary
from conftest import TINY, compose_config
from trainrun import assert_one_line_error, env, one_thread  # noqa: F401 (a fixture)

COMMANDS = ("train", "extract", "evaluate", "caption")


def command(name: str, *args: str, cwd: Path, extra_env: dict | None = None, timeout: float = 240):
    return subprocess.run([sys.executable, "-m", f"captioner.{name}", *args], cwd=cwd, env={**env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout)


def no_network(tmp_path: Path) -> dict:
    """Downloads fail at once, with or without internet: an empty hub cache and a proxy that refuses."""
    return {"TORCH_HOME": str(tmp_path / "hub"), "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
            "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": ""}


def tiny_images(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def checkpoint_for(path: Path, *overrides: str) -> Path:
    """A checkpoint in the format training writes, nothing trained, for the encoder ``overrides`` name."""
    cfg = compose_config("train", ["model.embed_dim=16", "model.hidden_dim=24", *overrides])
    vocab = Vocabulary([*SPECIALS, "a", "red", "square"])
    feature_dim = ENCODER_DIMS[cfg.encoder.name]
    save_checkpoint(path, {"format": FORMAT, "config": OmegaConf.to_container(cfg, resolve=True),
                           "vocab": vocab.to_dict(), "feature_dim": feature_dim,
                           "model": build_model(cfg.model, len(vocab), feature_dim).state_dict()})
    return path


# --- out-of-range values: named by key, refused before any work ----------------------------------

OUT_OF_RANGE = {
    "train": [("optim.lr=-1", "optim.lr=-1.0: must be greater than 0.0"),
              ("train.batch_size=0", "train.batch_size=0: must be at least 1"),
              ("decode.beam_size=0", "decode.beam_size=0: must be at least 1"),
              ("model.dropout=1.5", "model.dropout=1.5: must be in [0.0, 1.0]"),
              ("encoder.input_size=8", "encoder.input_size=8: must be at least 32"),
              ("objective.label_smoothing=2", "objective.label_smoothing=2.0: must be in [0.0, 1.0]"),
              ("data.holdout=0.9", "data.holdout=0.9: must be in [0.0, 0.5]"),
              ("train.monitor=METEOR", "train.monitor='METEOR': choose one of Bleu_1, Bleu_2, Bleu_3, Bleu_4, CIDEr"),
              ("objective=scst objective.samples=1", "objective.samples=1: must be at least 2"),
              ("objective=scst objective.temperature=0", "objective.temperature=0.0: must be greater than 0.0"),
              ("objective=scst objective.baseline=max", "objective.baseline='max': choose one of mean, greedy"),
              ("objective=scst objective.cider_weight=-1", "objective.cider_weight=-1.0: must be at least 0.0"),
              ("objective=scst objective.cider_weight=0 objective.bleu_weight=0",
               "objective.cider_weight=0 and objective.bleu_weight=0: the reward would be 0; give one a weight"),
              ("model=show_attend_tell model.attention_penalty=-1",
               "model.attention_penalty=-1.0: must be at least 0.0"),
              ("model=show_attend_tell model.attention_dim=0", "model.attention_dim=0: must be at least 1"),
              ("decode.diversity=-1", "decode.diversity=-1.0: must be at least 0.0")],
    "extract": [("encoder.batch_size=0", "encoder.batch_size=0: must be at least 1"),
                ("data.max_length=0", "data.max_length=0: must be at least 1"),
                ("encoder.crop_pct=0", "encoder.crop_pct=0.0: must be in (0.0, 1.0]")],
    "evaluate": [("decode.beam_size=0", "decode.beam_size=0: must be at least 1"),
                 ("decode.top_p=0", "decode.top_p=0.0: must be in (0.0, 1.0]"),
                 ("decode=beam decode.n_best=5", "decode.n_best=5: must be between 1 and decode.beam_size=3"),
                 ("decode=beam decode.groups=2", "decode.groups=2: must divide decode.beam_size=3"),
                 ("decode.groups=0", "decode.groups=0: must be at least 1"),
                 ("tokenizer=perl", "tokenizer='perl': choose one of auto, java, python")],
    "caption": [("batch_size=0", "batch_size=0: must be at least 1"),
                ("decode.temperature=0", "decode.temperature=0.0: must be greater than 0.0"),
                ("decode.max_length=0", "decode.max_length=0: must be at least 1"),
                ("decode.repetition_penalty=0.5", "decode.repetition_penalty=0.5: must be at least 1.0")],
}


@pytest.mark.parametrize("name, override, expected",
                         [(name, o, e) for name, cases in OUT_OF_RANGE.items() for o, e in cases])
def test_out_of_range_values_are_named_by_key_for_every_command(name, override, expected):
    assert check_config(name, override.split()) == expected


@pytest.mark.parametrize("name", COMMANDS)
def test_an_out_of_range_value_stops_a_command_before_any_work(name, tmp_path):
    root = tmp_path / "never_made"
    override, expected = OUT_OF_RANGE[name][0]
    args = {"train": [f"data.root={root}", f"train.out_dir={tmp_path / 'run'}"],
            "extract": [f"data.root={root}"],
            "evaluate": [f"checkpoint={tmp_path / 'none.pt'}"],
            "caption": [str(tmp_path), f"checkpoint={tmp_path / 'none.pt'}"]}[name]
    proc = command(name, *args, override, cwd=tmp_path)
    assert_one_line_error(proc, expected)
    assert proc.stdout == "" and not root.exists() and not (tmp_path / "run").exists()
    assert not (tmp_path / "outputs").exists()  # Hydra never started: no run folder, no log


# --- encoder weights that cannot be downloaded ----------------------------------------------------

@pytest.mark.parametrize("name", COMMANDS)
def test_encoder_weights_that_cannot_be_downloaded_are_one_line(name, tmp_path, shapes_root):
    if name in ("train", "extract"):
        encoder = "vgg16" if name == "train" else "resnet50"
        args = [*TINY, f"data.root={shapes_root}", "encoder.pretrained=true", f"encoder={encoder}",
                f"hydra.run.dir={tmp_path / 'run'}"]
    else:
        ckpt = checkpoint_for(tmp_path / "resnet.pt", "encoder=resnet50")
        args = ([f"checkpoint={ckpt}", "split=test"] if name == "evaluate"
                else [str(tiny_images(tmp_path / "photos")), f"checkpoint={ckpt}", f"output={tmp_path / 'c.json'}"])
    proc = command(name, *args, cwd=tmp_path, extra_env=no_network(tmp_path))
    line = assert_one_line_error(proc, "cannot download", "weights", "encoder.weights=PATH")
    assert "resnet50" in line or "vgg16" in line


# --- results and annotations files ------------------------------------------------------------

@pytest.mark.parametrize("broken, content, expected", [
    ("results", "this is not JSON", "results file {results} is not valid JSON (Expecting value at line 1 column 1)"),
    ("annotations", '{"images": [', "annotations file {annotations} is not valid JSON"),
    ("results", '{"image_id": 1}', "results file {results} is not in the COCO results format"),
    ("results", '[{"image_id": 1}]', "results file {results} is not in the COCO results format"),
    ("annotations", '{"images": []}', "annotations file {annotations} is not a COCO captions file"),
    ("annotations", None, "annotations file not found: {annotations}"),
])
def test_a_bad_results_or_annotations_file_is_one_line_naming_it(tmp_path, broken, content, expected):
    files = {"results": tmp_path / "results.json", "annotations": tmp_path / "captions.json"}
    files["results"].write_text(json.dumps([{"image_id": 1, "caption": "a red square"}]))
    files["annotations"].write_text(json.dumps({"images": [{"id": 1}], "annotations": [
        {"image_id": 1, "id": 1, "caption": "a red square"}]}))
    if content is None:
        files[broken].unlink()
    else:
        files[broken].write_text(content)
    proc = command("evaluate", f"results={files['results']}", f"annotations={files['annotations']}",
                   "tokenizer=python", "metrics=[bleu]", cwd=tmp_path)
    assert_one_line_error(proc, expected.format(**files))


# --- a write that fails: the previous checkpoint stays -----------------------------------------

def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(tiny_cfg, monkeypatch, capsys):
    import errno

    from captioner.cli import known_errors
    from captioner.training.trainer import train

    cfg = tiny_cfg()
    real_save, saves = torch.save, []

    def save(obj, f, *args, **kwargs):
        saves.append(f.name)
        if len(saves) > 3:  # epoch 1's last.pt (before and after validation) and best.pt fit; epoch 2's does not
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as info, known_errors():
        train(cfg)
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    last = Path(cfg.train.out_dir) / "last.pt"
    assert err == [f"error: cannot write {last}: No space left on device; the previous file, if any, is intact"]
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(last)["epoch"] == 1  # the previous one, whole
    assert not list(last.parent.glob(".*.tmp"))


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a tmpfs needs root")
def test_a_full_tmpfs_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, shapes_root, tiny_cfg):
    """The real thing: a run on a small tmpfs that has room for two checkpoints and a half."""
    from captioner.training.trainer import train

    probe = tiny_cfg("train.epochs=1")
    train(probe)
    size = (Path(probe.train.out_dir) / "last.pt").stat().st_size
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(2.5 * size) + 65536}", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        out = disk / "run"
        proc = command("train", *TINY, f"data.root={shapes_root}", f"train.out_dir={out}", "train.save_every=1",
                       cwd=tmp_path)
        line = assert_one_line_error(proc, f"cannot write {out}/", "No space left on device",
                                     "the previous file, if any, is intact")
        assert "last.pt" in line or "best.pt" in line
        survivor = load_checkpoint(out / "last.pt")
        assert survivor["step"] >= 1 and not list(out.glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# --- one live run per directory -------------------------------------------------------------

def test_a_second_run_on_a_live_runs_directory_is_refused(tmp_path, shapes_root):
    import signal

    from trainrun import start, wait_for_step

    out = tmp_path / "run"
    live = start(shapes_root, out, f"train.out_dir={out}", "train.log_every=1", "train.epochs=3")
    try:
        wait_for_step(live, 2)
        os.kill(live.pid, signal.SIGSTOP)  # held mid-run (a tiny run would finish before the second starts)
        before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "train.log"}
        second = command("train", *TINY, f"data.root={shapes_root}", f"train.out_dir={out}", cwd=tmp_path)
        line = assert_one_line_error(second, f"{out} is in use by a live training run", f"pid {live.pid}",
                                     "another train.out_dir")
        assert line and second.stdout == ""
        assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")
                if p.name in before} == before  # the refused run wrote nothing there
        os.kill(live.pid, signal.SIGCONT)
        rest, _ = live.communicate(timeout=240)
    finally:
        live.kill()
    assert live.returncode == 0, rest[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert load_checkpoint(out / "last.pt")["epoch"] == 3
    assert not (out / "run.lock").exists()  # released at exit


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, shapes_root):
    out = tmp_path / "run"
    out.mkdir()
    # the lock of a run that was killed: its file is there, nobody holds it
    (out / "run.lock").write_text(json.dumps({"host": "elsewhere", "pid": 999999, "started": "2026-01-01 00:00:00"}))
    proc = command("train", *TINY, f"data.root={shapes_root}", f"train.out_dir={out}", "train.epochs=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "taking over a lock left by a run that no longer exists (pid 999999 on elsewhere" in proc.stdout
    assert (out / "last.pt").is_file() and not (out / "run.lock").exists()


# --- a run directory holds its own log and config --------------------------------------------

def test_the_run_directory_holds_its_log_and_composed_config(tmp_path, shapes_root):
    out = tmp_path / "named run"
    proc = command("train", *TINY, f"data.root={shapes_root}", f"train.out_dir='{out}'", "train.epochs=1",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epoch 1 step" in (out / "train.log").read_text()
    saved = OmegaConf.load(out / ".hydra" / "config.yaml")
    assert saved.train.out_dir == str(out) and saved.model.name == "show_tell"
    assert not (tmp_path / "outputs").exists()


# --- checkpoints written before this change -------------------------------------------------

def old_format(ckpt: dict) -> dict:
    """``ckpt`` as the format-2 code path wrote it: no model.name, no objective group, label
    smoothing a model option."""
    config = json.loads(json.dumps(ckpt["config"]))
    config["model"].pop("name")
    config["model"]["label_smoothing"] = config.pop("objective")["label_smoothing"]
    return {**ckpt, "format": 2, "config": config}


def test_checkpoints_of_the_previous_format_still_load_for_evaluate_and_caption(tiny_cfg, tmp_path, one_thread):
    from captioner.training.trainer import train

    cfg = tiny_cfg("train.epochs=1")
    train(cfg)
    new = Path(cfg.train.out_dir) / "best.pt"
    old = tmp_path / "old" / "best.pt"
    save_checkpoint(old, old_format(load_checkpoint(new)))
    assert torch.load(old, weights_only=True)["format"] == 2

    captions = {}
    for name, path in (("new", new), ("old", old)):
        proc = command("evaluate", f"checkpoint={path}", "split=test", "metrics=[bleu]", "tokenizer=python",
                       f"output_dir={tmp_path / name}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        captions[name] = json.loads((tmp_path / name / "results_test_greedy.json").read_text())
        folder = tiny_images(tmp_path / "photos")
        proc = command("caption", str(folder), f"checkpoint={path}", f"output={tmp_path / name / 'c.json'}",
                       cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        captions[name + "_folder"] = json.loads((tmp_path / name / "c.json").read_text())
    assert captions["old"] == captions["new"] and captions["old_folder"] == captions["new_folder"]


def test_a_checkpoint_of_a_newer_format_is_refused_with_one_line(tmp_path):
    path = checkpoint_for(tmp_path / "future.pt", "encoder.pretrained=false")
    save_checkpoint(path, {**load_checkpoint(path), "format": FORMAT + 1})
    proc = command("caption", str(tiny_images(tmp_path / "photos")), f"checkpoint={path}", cwd=tmp_path)
    assert_one_line_error(proc, f"{path} was written by a newer captioner (checkpoint format {FORMAT + 1}",
                          "upgrade captioner")
