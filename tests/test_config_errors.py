"""Mistakes a user makes at the command line or in the data: one clear line, exit status 1, no traceback."""
import logging

import numpy as np
import pytest
from PIL import Image

from captioner.training.checkpoint import load_checkpoint, save_checkpoint
from captioner.cli import check_config
from captioner.data import ImageRecord
from captioner.data.batches import CaptionBatches
from captioner.data import drop_empty_captions
from captioner.data.vocab import Vocabulary
from trainrun import assert_one_line_error, run


# --- the config ----------------------------------------------------------------------------

def test_a_misspelled_key_is_one_line_naming_it(tmp_path, shapes_root):
    proc = run(shapes_root, tmp_path / "run", "train.bach_size=8")
    line = assert_one_line_error(proc, "unknown config key 'train.bach_size'", "did you mean train.batch_size?")
    assert proc.stdout == ""  # stopped before anything ran
    assert not (tmp_path / "run").exists()
    assert line.count("\n") == 0


def test_a_wrong_type_is_one_line_naming_the_key(tmp_path, shapes_root):
    proc = run(shapes_root, tmp_path / "run", "train.epochs=two")
    assert_one_line_error(proc, "bad value for 'train.epochs'", "'two'", "Integer")


@pytest.mark.parametrize("overrides, expected", [
    (["train.bach_size=8"], "unknown config key 'train.bach_size' (Key 'bach_size' not in 'TrainConfig'; "
                            "did you mean train.batch_size?)"),
    (["model.dropuot=0.1"], "unknown config key 'model.dropuot' (Key 'dropuot' not in 'ShowTellConfig'; "
                            "did you mean model.dropout?)"),
    (["+train.sav_every=5"], "unknown config key 'train.sav_every' (TrainConfig has no such field; "
                             "did you mean train.save_every?)"),
    (["train.batch_size=abc"], "bad value for 'train.batch_size': Value 'abc' of type 'str' could not be "
                               "converted to Integer"),
    (["optim.lr=fast"], "bad value for 'optim.lr': Value 'fast' of type 'str' could not be converted to Float"),
    (["data.root=null"], "bad value for 'data.root': field 'data.root' is not Optional"),
    (["optim=adamw"], "no config 'adamw' in group 'optim' (choose adam)"),
    (["train.batch_size=["], "cannot parse override 'train.batch_size=[': no viable alternative at input '['"),
    (["train.batch_size=8", "train.resume=auto", "hydra.run.dir=/tmp/x"], None),
])
def test_config_checks_name_the_key(overrides, expected):
    assert check_config("train", overrides) == expected


def test_a_bad_choice_inside_a_component_is_one_line(tmp_path, shapes_root):
    proc = run(shapes_root, tmp_path / "run", "model.cell=transformer")
    assert_one_line_error(proc, "model.cell='transformer': choose one of lstm, gru, rnn")


# --- the data ------------------------------------------------------------------------------

def write_flickr8k(root, corrupt=(), missing=()):
    """A tiny Flickr8k-layout data set: 4 train, 1 val, 1 test image, 2 captions each."""
    names = {"train": ["1001_a.jpg", "1002_b.jpg", "1003_c.jpg", "1004_d.jpg"], "val": ["1005_e.jpg"],
             "test": ["1006_f.jpg"]}
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    tokens = []
    for split, files in names.items():
        (root / {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                 "test": "Flickr_8k.testImages.txt"}[split]).write_text("\n".join(files) + "\n")
        for name in files:
            tokens += [f"{name}#0\ta dog runs on the grass .", f"{name}#1\tun café près de l'église ☕"]
            if name in missing:
                continue
            if name in corrupt:
                (root / "images" / name).write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
            else:
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "images" / name)
    (root / "Flickr8k.token.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")


FLICKR = ["data.name=flickr8k", "data.min_count=1", "train.epochs=1", "train.batch_size=4", "encoder.batch_size=4"]


def test_a_missing_and_an_unreadable_image_are_named_and_stop_the_run(tmp_path):
    root = tmp_path / "flickr8k"
    write_flickr8k(root, corrupt=["1003_c.jpg"], missing=["1004_d.jpg"])
    proc = run(root, tmp_path / "run", *FLICKR, f"data.root={root}")
    line = assert_one_line_error(proc, "1 unreadable image(s) in split 'train'", "1003_c.jpg",
                                 "data.on_bad_image=skip")
    assert "1004_d.jpg" not in line
    assert "missing from" in proc.stdout and "1004_d.jpg" in proc.stdout  # the reader's warning names it


def test_a_missing_data_set_is_one_line(tmp_path, shapes_root):
    proc = run(shapes_root, tmp_path / "run", *FLICKR, f"data.root={tmp_path / 'nowhere'}")
    assert_one_line_error(proc, "Flickr8k root", "nowhere", "does not exist")


def test_empty_captions_are_skipped_with_a_count(caplog):
    records = {"train": [ImageRecord(1, "a.jpg", ["a red circle", "", "   ", ". ,"]),
                         ImageRecord(2, "b.jpg", ["", " "])],
               "val": [ImageRecord(3, "c.jpg", ["a blue square"])]}
    with caplog.at_level(logging.WARNING, logger="captioner.data"):
        cleaned = drop_empty_captions(records)
    assert [r.captions for r in cleaned["train"]] == [["a red circle"]]
    assert cleaned["val"] == records["val"]
    assert "split train: skipped 5 empty caption(s); 1 image(s) had no other caption and are skipped too (e.g. b.jpg)" \
        in caplog.text


def test_non_ascii_and_very_long_captions(tmp_path):
    captions = ["Un café près de l'église", "Две кошки на диване", "一只猫 在 沙发 上", "a dog 🐕 runs",
                " ".join(["word"] * 500)]
    vocab = Vocabulary.build(captions, min_count=1)
    for word in ("café", "l'église", "кошки", "一只猫"):
        assert word in vocab.stoi, word
    assert vocab.decode(vocab.encode("a dog 🐕 runs")) == "a dog runs"  # the PTB tokenizer drops symbols
    records = [ImageRecord(i, f"{i}.jpg", [c]) for i, c in enumerate(captions)]
    batches = CaptionBatches(np.zeros((5, 4), np.float32), records, vocab, max_length=16, batch_size=5)
    assert batches.tokens.shape == (5, 18)  # the 500-word caption is cut to data.max_length (+ <bos>, <eos>)
    assert vocab.decode(vocab.encode("Две кошки на диване")) == "две кошки на диване"
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json") == vocab
    save_checkpoint(tmp_path / "v.pt", {"vocab": vocab.to_dict()})  # plain strings load with weights_only
    assert Vocabulary.from_dict(load_checkpoint(tmp_path / "v.pt")["vocab"]) == vocab


@pytest.mark.parametrize("override, expected", [
    ("train.precision=fp8", "train.precision='fp8': choose one of fp32, bf16, fp16"),
    ("train.monitor=METEOR", "train.monitor='METEOR': choose one of Bleu_1, Bleu_2, Bleu_3, Bleu_4, CIDEr"),
    ("optim.schedule=cosin", "optim.schedule='cosin': choose one of cosine, step, constant"),
    ("train.batch_size=0", "train.batch_size=0: must be at least 1"),
])
def test_bad_choices_fail_before_any_data_is_read(tmp_path, override, expected):
    from conftest import compose_config
    from captioner.training.trainer import train

    cfg = compose_config("train", ["data.name=flickr8k", f"data.root={tmp_path / 'nowhere'}",
                                   f"train.out_dir={tmp_path / 'run'}", override])
    with pytest.raises(ValueError) as info:  # not FileNotFoundError: the data set was never looked at
        train(cfg)
    assert str(info.value) == expected
    assert not (tmp_path / "run").exists()
