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


# --- a checkpoint from someone else is validated like a command line before anything is built ---

def _stranger(tmp_path: Path, change) -> Path:
    """A real (untrained) checkpoint, then edited by ``change(ckpt)`` as someone else's file might be."""
    from test_caption import untrained_checkpoint

    from captioner.training.checkpoint import load_checkpoint, save_checkpoint

    path = untrained_checkpoint(tmp_path / "theirs.pt")
    ckpt = load_checkpoint(path)
    change(ckpt)
    save_checkpoint(path, ckpt)
    return path


def _evaluate(checkpoint: Path, tmp_path: Path):
    import subprocess
    import sys

    from trainrun import env

    return subprocess.run([sys.executable, "-m", "captioner.evaluate", f"checkpoint={checkpoint}", "split=test",
                           "progress=false", f"output_dir={tmp_path / 'eval'}"], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("change, expected", [
    (lambda c: c["config"]["model"].update(hidden_dim=10**9), "does not fit the model its own config describes"),
    (lambda c: c["config"]["model"].update(cell="transformer"), "model.cell='transformer': choose one of lstm, gru, rnn"),
    (lambda c: c["config"]["model"].update(name="transformer"), "model.name='transformer': choose one of"),
    (lambda c: c["config"]["train"].update(batch_size=0), "train.batch_size=0: must be at least 1"),
    (lambda c: c["config"]["encoder"].update(bogus=1), "encoder.bogus"),
    (lambda c: c.update(config="model: {hidden_dim: 1}"), "its config is a str, not a mapping"),
    (lambda c: c["config"]["encoder"].update(weights="/etc/passwd"), "encoder.weights=/etc/passwd is not a PyTorch weights file"),
], ids=["absurd-size", "unknown-cell", "unknown-model", "out-of-range", "unknown-key", "string-config", "foreign-weights"])
def test_a_strangers_checkpoint_is_refused_in_one_line_before_anything_is_built(tmp_path, change, expected):
    from captioner.cli import one_line
    from captioner.encoding.encoders import WeightsUnavailableError
    from captioner.training.checkpoint import CheckpointError
    from captioner.training.restore import restore_model

    checkpoint = _stranger(tmp_path, change)
    with pytest.raises((CheckpointError, WeightsUnavailableError)) as info:
        restore_model(checkpoint, with_encoder=True)
    assert expected in one_line(info.value) and "\n" not in str(info.value)


def test_the_evaluate_command_refuses_a_checkpoint_of_absurd_size_in_one_line(tmp_path):
    checkpoint = _stranger(tmp_path, lambda c: c["config"]["model"].update(hidden_dim=10**9))
    assert_one_line_error(_evaluate(checkpoint, tmp_path), "does not fit the model its own config describes")
    assert not (tmp_path / "eval").exists() and not (tmp_path / "data").exists()  # nothing written anywhere


def test_an_empty_checkpoint_file_is_one_line(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    assert_one_line_error(_evaluate(tmp_path / "empty.pt", tmp_path), f"cannot read checkpoint {tmp_path / 'empty.pt'}")


def test_a_folder_with_a_file_name_that_is_not_utf8_captions_the_rest_and_names_it(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from PIL import Image
    from test_caption import untrained_checkpoint

    from trainrun import env

    checkpoint = untrained_checkpoint(tmp_path / "best.pt", "model.hidden_dim=512")
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30), "red").save(folder / name)
    Image.new("RGB", (40, 30), "blue").save(os.path.join(os.fsencode(folder), b"caf\xe9.png"))  # Latin-1 bytes
    out = tmp_path / "captions.json"
    proc = subprocess.run([sys.executable, "-m", "captioner.caption", str(folder), f"checkpoint={checkpoint}",
                           f"output={out}", "html=true", "progress=false"], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [c["file_name"] for c in json.loads(out.read_text())] == ["a.png", "b.png"]
    assert "skipped caf\\xe9.png: its name is not valid UTF-8; rename it" in proc.stderr
    assert "Traceback" not in proc.stderr and out.with_suffix(".html").is_file()


def test_the_shapes_generator_never_writes_into_a_users_folder(tmp_path):
    """data.root=DIR with the shapes default (data= forgotten) on a folder of the user's own: one
    line, nothing written; with a captions.json of another kind there too."""
    from PIL import Image

    from captioner.data.shapes import load_shapes

    mine = tmp_path / "my_photos"
    (mine / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(mine / "images" / "train_00000.png")
    (mine / "notes.txt").write_text("mine")
    before = snapshot(mine)
    with pytest.raises(ValueError, match=r"is not a folder the shapes generator made \(it holds notes.txt\)"):
        load_shapes(str(mine), num_train=2, num_val=1, num_test=1, image_size=32)
    (mine / "notes.txt").unlink()
    (mine / "captions.json").write_text('{"images": [], "annotations": []}')  # a COCO file, not ours
    before = snapshot(mine)
    with pytest.raises(ValueError, match="is not a folder the shapes generator made"):
        load_shapes(str(mine), num_train=2, num_val=1, num_test=1, image_size=32)
    assert snapshot(mine) == before

    fresh = tmp_path / "new"
    assert len(load_shapes(str(fresh), num_train=2, num_val=1, num_test=1, image_size=32)["train"]) == 2
    assert len(load_shapes(str(fresh), num_train=3, num_val=1, num_test=1, image_size=32)["train"]) == 3  # its own


def test_special_tokens_written_in_a_caption_are_words_not_tokens():
    from captioner.data.vocab import BOS_ID, EOS_ID, UNK_ID, Vocabulary

    vocab = Vocabulary.build(["a dog runs", "a dog"], min_count=1)
    ids = vocab.encode("a dog <eos> runs <pad> <bos>")
    assert ids == [BOS_ID, vocab.stoi["a"], vocab.stoi["dog"], UNK_ID, vocab.stoi["runs"], UNK_ID, UNK_ID, EOS_ID]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("results, expected", [
    ('[{"image_id": 1, "caption": null}]', "entry 0 (image 1) has caption None, not a string"),
    ('[{"image_id": 1, "caption": 7}]', "entry 0 (image 1) has caption 7, not a string"),
    ('[{"image_id": [1, 2], "caption": "a dog"}]', "entry 0 has image_id [1, 2], not a number or a string"),
    ('[{"image_id": 1, "caption": "a \\udce9 dog"}]', "has a caption with a lone surrogate"),
    ("[" * 100_000 + "]" * 100_000, "nests its values too deeply"),
], ids=["null-caption", "numeric-caption", "list-image-id", "lone-surrogate", "deep-json"])
def test_a_bad_results_file_is_one_line_naming_it(tmp_path, results, expected):
    from captioner.evaluation.metrics import score_results_file

    annotations = _write(tmp_path / "captions.json",
                         '{"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "a dog runs"}]}')
    path = _write(tmp_path / "results.json", results)
    with pytest.raises(ValueError) as info:
        score_results_file(path, annotations, metrics=("bleu",), tokenizer="python")
    assert expected in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("content, expected", [
    ('{"images": [{"id": 1, "file_name": "/etc/hostname"}], "annotations": [{"id": 1, "image_id": 1, "caption": "x"}]}',
     "image '/etc/hostname' is outside its image folder"),
    ('{"images": [{"id": 1, "file_name": "../secret.png"}], "annotations": [{"id": 1, "image_id": 1, "caption": "x"}]}',
     "image '../secret.png' is outside its image folder"),
    ('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"id": 1, "image_id": 1, "caption": null}]}',
     "image 1 has a caption None, not a string"),
    ("[" * 100_000 + "]" * 100_000, "nests its values too deeply"),
    (b'{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"id": 1, "image_id": 1, "caption": "caf\xe9"}]}',
     "is not UTF-8 text"),
], ids=["absolute-file-name", "climbing-file-name", "null-caption", "deep-json", "latin-1"])
def test_a_bad_coco_format_file_is_one_line_naming_it(tmp_path, content, expected):
    from captioner.data.coco import load_coco_format

    (tmp_path / "images").mkdir()
    (tmp_path / "secret.png").write_bytes(b"not for the model")
    captions = tmp_path / "captions.json"
    captions.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as info:
        load_coco_format(str(captions), str(tmp_path / "images"), holdout=0.5)
    assert expected in str(info.value) and str(captions) in str(info.value) and "\n" not in str(info.value)


def test_an_out_dir_that_is_a_file_or_cannot_be_written_is_one_line(shapes_root, tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    proc = run(shapes_root, tmp_path / "unused", *FAST, f"train.out_dir={taken}")
    assert_one_line_error(proc, f"train.out_dir={taken} is a file, not a directory")
    assert taken.read_text() == "mine"
    proc = run(shapes_root, tmp_path / "unused", *FAST, "train.out_dir=/proc/captioner-run")  # (proc: no new dirs)
    assert_one_line_error(proc, "train.out_dir=/proc/captioner-run cannot be written")


def test_evaluate_in_results_mode_refuses_html_in_one_line(tmp_path):
    from captioner.evaluate import run as evaluate_run

    annotations = _write(tmp_path / "captions.json",
                         '{"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "a dog runs"}]}')
    results = _write(tmp_path / "results.json", '[{"image_id": 1, "caption": "a dog runs"}]')
    cfg = compose_config("evaluate", [f"results={results}", f"annotations={annotations}", "html=true",
                                      "tokenizer=python", "metrics=[bleu]"])
    with pytest.raises(ValueError, match="html=true needs checkpoint=PATH"):
        evaluate_run(cfg)


def test_evaluate_skips_unreadable_images_when_asked(tiny_cfg, tmp_path):
    """data.on_bad_image=skip, which the unreadable-image line recommends, holds in evaluate too."""
    from omegaconf import OmegaConf

    from captioner.evaluate import evaluate_checkpoint
    from captioner.data.images import BadImageError

    cfg = tiny_cfg(*FAST, f"data.root={tmp_path / 'data'}")
    train(cfg)
    (tmp_path / "data" / "images" / "test_00003.png").write_bytes(b"broken")
    (tmp_path / "data" / "features").rename(tmp_path / "old_features")  # the cache would still describe it
    checkpoint = f"{cfg.train.out_dir}/best.pt"
    with pytest.raises(BadImageError, match="test_00003.png"):
        evaluate_checkpoint(checkpoint, split="test", metrics=("bleu",), tokenizer="python", device="cpu",
                            progress=False, output_dir=str(tmp_path / "eval"))
    skip = OmegaConf.merge(cfg.data, {"on_bad_image": "skip"})
    scores = evaluate_checkpoint(checkpoint, split="test", data_cfg=skip, metrics=("bleu",), tokenizer="python",
                                 device="cpu", progress=False, output_dir=str(tmp_path / "eval"))
    assert 0.0 <= scores["Bleu_4"] <= 1.0
    import json
    report = json.loads((tmp_path / "eval" / "metrics_test_greedy.json").read_text())
    assert report["num_images"] == 11  # 12 test images, one unreadable


# --- what a checkpoint names is read, never written ---

def test_a_checkpoints_relative_data_root_generates_nothing_under_the_working_directory(tmp_path):
    """The checkpoint says data.root=data/shapes (relative): evaluating it elsewhere used to
    generate 2,500 images under the working directory."""
    from test_caption import untrained_checkpoint

    checkpoint = untrained_checkpoint(tmp_path / "theirs.pt")
    assert_one_line_error(_evaluate(checkpoint, tmp_path), "data.root=data/shapes holds no shapes data set",
                          "python -m captioner.extract data.root=data/shapes")
    assert not (tmp_path / "data").exists() and not list(tmp_path.rglob("*.png"))  # (outputs/: Hydra's log)


def test_a_checkpoints_own_folders_are_only_read(tmp_path):
    """A checkpoint whose data.root and encoder.cache_dir name someone's folders: evaluate reads
    the data there, computes the features it lacks in memory, and writes into neither; a data
    root from the command line is generated as usual."""
    from omegaconf import OmegaConf

    from captioner.data.shapes import load_shapes
    from captioner.evaluate import evaluate_checkpoint
    from captioner.training.checkpoint import load_checkpoint

    tiny = {"num_train": 48, "num_val": 12, "num_test": 12, "image_size": 64}
    theirs, their_cache = tmp_path / "their_data", tmp_path / "their_cache"
    load_shapes(str(theirs), tiny["num_train"], tiny["num_val"], tiny["num_test"], tiny["image_size"])
    their_cache.mkdir()
    (their_cache / "notes.txt").write_text("theirs")
    before = snapshot(tmp_path)
    checkpoint = _stranger(tmp_path, lambda c: (c["config"]["data"].update(root=str(theirs), **tiny),
                                                c["config"]["encoder"].update(cache_dir=str(their_cache))))
    options = dict(split="test", metrics=("bleu",), tokenizer="python", device="cpu", progress=False,
                   output_dir=str(tmp_path / "eval"))
    first = evaluate_checkpoint(str(checkpoint), **options)
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    assert not [k for k in after if k not in before and not k.startswith(("eval/", "theirs.pt"))], after

    mine = OmegaConf.merge(load_checkpoint(checkpoint)["config"]["data"], {"root": str(tmp_path / "mine")})
    assert evaluate_checkpoint(str(checkpoint), data_cfg=mine, **options) == first  # the same images, generated
    assert (tmp_path / "mine" / "captions.json").is_file()
    assert snapshot(their_cache) == {"notes.txt": before["their_cache/notes.txt"]}


# --- sizes beyond the machine: one line, not an allocation traceback ---

def _limited_memory(gib: int = 8):
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (gib << 30, gib << 30))
    return limit


def test_a_results_file_of_100_mb_under_a_memory_limit_is_one_line(tmp_path):
    import subprocess
    import sys

    from trainrun import env

    annotations = _write(tmp_path / "captions.json",
                         '{"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "a dog runs"}]}')
    results = _write(tmp_path / "results.json", '[{"image_id": 1, "caption": "' + "a dog " * 17_500_000 + '"}]')
    proc = subprocess.run([sys.executable, "-m", "captioner.evaluate", f"results={results}",
                           f"annotations={annotations}", "tokenizer=python"], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=120, preexec_fn=_limited_memory())
    assert_one_line_error(proc, f"{results}: entry 0 (image 1) has a caption of 105,000,000 characters")


def test_a_beam_too_wide_for_memory_is_one_line(tmp_path):
    import subprocess
    import sys

    from trainrun import env

    from test_caption import untrained_checkpoint

    checkpoint = untrained_checkpoint(tmp_path / "best.pt", "model.hidden_dim=512")
    proc = subprocess.run([sys.executable, "-m", "captioner.evaluate", f"checkpoint={checkpoint}", "split=test",
                           "decode=beam", "decode.beam_size=100000", "progress=false", "data=shapes",
                           f"data.root={tmp_path / 'data'}", "data.num_train=4", "data.num_val=2",
                           "data.num_test=10", "data.image_size=32", f"output_dir={tmp_path / 'eval'}"],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=_limited_memory())
    assert_one_line_error(proc, "out of memory (an allocation of", "lower decode.beam_size or decode.batch_size")
    assert not (tmp_path / "eval").exists()
