"""The CUDA path: training in each precision, decoding, resume and captioning on a GPU. Every
test here skips without CUDA; scripts/gpu_check.sh runs them on the GPU machine."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.training.checkpoint import load_checkpoint
from captioner.runtime import Interrupted
from captioner.training.trainer import train
from conftest import TINY, compose_config
from test_resume import RUN, assert_same_state, interrupt_at

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def cfg_for(shapes_root, out_dir, *overrides):
    return compose_config("train", [*TINY, f"data.root={shapes_root}", f"train.out_dir={out_dir}", *RUN,
                                    "train.device=cuda", *overrides])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_training_follows_fp32(tmp_path, shapes_root, precision):
    """Same data, seed and steps: the epoch losses within 2% of fp32's, the last validation's
    BLEU-4 within 0.1 (autocast rounds activations to 8 or 11 mantissa bits)."""
    full = train(cfg_for(shapes_root, tmp_path / "fp32", "model.dropout=0"))
    reduced = train(cfg_for(shapes_root, tmp_path / precision, "model.dropout=0", f"train.precision={precision}"))
    assert math.isclose(reduced["train/loss"], full["train/loss"], rel_tol=0.02), (reduced, full)
    assert abs(reduced["val/Bleu_4"] - full["val/Bleu_4"]) < 0.1
    if precision == "fp16":  # the loss scale travels in the checkpoint for an exact resume
        assert load_checkpoint(tmp_path / precision / "last.pt")["scaler"]


def test_beam_search_on_cuda_gives_the_cpu_captions(tmp_path, shapes_root):
    from captioner.training.restore import restore_model
    from captioner.decoding.search import generate

    train(cfg_for(shapes_root, tmp_path / "run"))
    features = torch.from_numpy(np.load(next((shapes_root / "features").glob("efficientnet_lite0_val.npy")))).float()
    captions = {}
    for device in ("cpu", "cuda"):
        model, *_ = restore_model(tmp_path / "run" / "last.pt", device)
        for method in ("beam", "greedy"):
            out = generate(model, features.to(device), method, beam_size=3, max_length=12)
            captions[device, method] = out.sequences
    assert captions["cuda", "beam"] == captions["cpu", "beam"]
    assert captions["cuda", "greedy"] == captions["cpu", "greedy"]


def test_resume_on_cuda_restores_the_cuda_rng_and_matches_an_uninterrupted_run(tmp_path, shapes_root, monkeypatch):
    """Dropout on the GPU draws from the CUDA generator: a resumed run must put it back."""
    reference = train(cfg_for(shapes_root, tmp_path / "ref"))
    out = tmp_path / "run"
    interrupt_at(monkeypatch, 11)
    with pytest.raises(Interrupted):
        train(cfg_for(shapes_root, out))
    monkeypatch.undo()
    stopped = load_checkpoint(out / "last.pt")
    assert stopped["rng"][0]["cuda"] is not None
    resumed = train(cfg_for(shapes_root, out, "train.resume=auto"))
    assert {k: v for k, v in resumed.items() if k != "time_s"} == {k: v for k, v in reference.items() if k != "time_s"}
    assert_same_state(load_checkpoint(tmp_path / "ref" / "last.pt"), load_checkpoint(out / "last.pt"))


def test_captioning_a_folder_on_cuda(tmp_path, shapes_root):
    from captioner.caption import caption_folder

    train(cfg_for(shapes_root, tmp_path / "run"))
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    cfg = compose_config("caption", [f"folder={folder}", f"checkpoint={tmp_path / 'run' / 'last.pt'}",
                                     f"output={tmp_path / 'captions.json'}", "device=cuda", "progress=false"])
    caption_folder(cfg)
    results = json.loads((tmp_path / "captions.json").read_text())
    assert len(results) == 5 and all(r["caption"] for r in results)
