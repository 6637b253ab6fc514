"""Data-parallel training with torchrun on CPU (Gloo): the same result as one process with the
same global batch, and exact resume of a stopped multi-process run."""
import random
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from captioner.training.distributed import Dist, shard_batches
from captioner.data.batches import Batch
from captioner.training.trainer import train
from conftest import TINY, compose_config
from trainrun import command, env, load, one_thread, wait_for_step  # noqa: F401 (fixture)

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "captioner.train")


def torchrun(shapes_root, run_dir, *overrides, timeout=300):
    return subprocess.run(command(shapes_root, run_dir, *overrides, module=TORCHRUN), cwd=run_dir.parent,
                          env=env(), capture_output=True, text=True, timeout=timeout)


def test_shards_split_every_batch_in_order_and_may_be_empty():
    features = torch.arange(5.0).view(5, 1)
    tokens = torch.tensor([[1, 5, 2, 0, 0], [1, 5, 6, 7, 2], [1, 2, 0, 0, 0], [1, 5, 2, 0, 0], [1, 6, 2, 0, 0]])
    rows = torch.arange(5)
    parts = [list(shard_batches([Batch(features, tokens, rows)], Dist(rank, 2)))[0] for rank in range(2)]
    assert parts[0][0].flatten().tolist() == [0.0, 1.0, 2.0] and parts[1][0].flatten().tolist() == [3.0, 4.0]
    assert parts[0][1].shape == (3, 5) and parts[1][1].shape == (2, 3)  # each trimmed to its longest caption
    assert parts[0].rows.tolist() == [0, 1, 2] and parts[1].rows.tolist() == [3, 4]
    small = [list(shard_batches([Batch(features[:1], tokens[:1], rows[:1])], Dist(rank, 2)))[0] for rank in range(2)]
    assert small[0][0].shape == (1, 1) and small[1][0].shape == (0, 1)
    assert [len(Dist(r, 3).part(7)) for r in range(3)] == [3, 2, 2]
    assert [Dist(r, 3).part(7).start for r in range(3)] == [0, 3, 5]


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path, shapes_root, one_thread):
    """Equal up to float rounding (sums in another order). Adam can blow rounding up in a
    coordinate whose gradient is about its eps (1e-8): its first step is lr * g / (|g| + eps).
    With global batches of 47 here one weight of 6144 ends 1.7e-5 away, all others < 2e-6; the
    batch size below has no such coordinate, so the test can hold everything to 1e-5."""
    # 240 pairs in global batches of 239: shards of 120 + 119 captions (and unequal token counts),
    # then a batch of one caption: rank 1's shard is empty and must still join the all-reduce
    overrides = ["train.batch_size=239", "model.dropout=0", "train.plot=false"]
    single = train(compose_config("train", [*TINY, f"data.root={shapes_root}", f"train.out_dir={tmp_path / 'ref'}",
                                            *overrides]))
    proc = torchrun(shapes_root, tmp_path / "run", *overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref, got = load(tmp_path / "ref" / "last.pt"), load(tmp_path / "run" / "last.pt")
    assert got["step"] == ref["step"] == 4 and got["world_size"] == 2 and len(got["rng"]) == 2
    for name, tensor in ref["model"].items():
        torch.testing.assert_close(got["model"][name], tensor, rtol=0, atol=1e-5, msg=name)
    last = got["history"][-1]
    assert last["train/loss"] == pytest.approx(single["train/loss"], abs=1e-4)
    assert last["val/Bleu_4"] == pytest.approx(single["val/Bleu_4"], abs=1e-6)
    # only rank 0 wrote: one log, one run directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref", "run"]
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("device cpu x 2 processes") == 1 and log.count("final val") == 1


@pytest.mark.slow
def test_torchrun_run_stopped_by_sigterm_resumes_exactly(tmp_path, shapes_root):
    """SIGTERM to torchrun (as a cluster scheduler sends it): every rank saves at the same step;
    resuming under torchrun gives the same weights as a run never stopped, dropout included
    (each rank's random stream is in the checkpoint)."""
    overrides = ["train.batch_size=16", "model.dropout=0.3", "train.plot=false", "train.log_every=1"]
    ref = torchrun(shapes_root, tmp_path / "ref", *overrides)
    assert ref.returncode == 0, ref.stderr[-4000:]

    proc = subprocess.Popen(command(shapes_root, tmp_path / "run", *overrides, "train.save_every=1", module=TORCHRUN),
                            cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    wait_for_step(proc, random.Random(7).randint(4, 26))
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    stopped = load(tmp_path / "run" / "last.pt")
    assert f"interrupted (SIGTERM) at step {stopped['step']}; saved" in output, output[-3000:]
    assert stopped["step"] < 30

    resumed = torchrun(shapes_root, tmp_path / "run", *overrides, "train.save_every=1", "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a, b = load(tmp_path / "ref" / "last.pt"), load(tmp_path / "run" / "last.pt")
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])


@pytest.mark.slow
def test_torchrun_extraction_writes_the_cache_one_process_writes(tmp_path, one_thread):
    """Two ranks encode their halves of each split (an odd number of images, an unreadable one in
    rank 0's half) into one cache: the same rows, skipped list and manifest as one process."""
    import json
    import sys

    import numpy as np

    from captioner.data import load_records
    from captioner.extract import extract
    from trainrun import ROOT

    common = [f"data.root={tmp_path / 'shapes'}", "data.num_train=9", "data.num_val=5", "data.num_test=4",
              "data.image_size=32", "data.on_bad_image=skip", "encoder.pretrained=false", "encoder.batch_size=2",
              "encoder.cache_dtype=float32", "train.device=cpu", "train.progress=false"]
    cfg = compose_config("extract", [*common, f"encoder.cache_dir={tmp_path / 'first'}"])
    extract(cfg)  # generates the data set
    Path(load_records(cfg.data)["train"][1].path).write_bytes(b"not an image")
    extract(compose_config("extract", [*common, f"encoder.cache_dir={tmp_path / 'one'}"]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "captioner.extract", *common, "encoder.compile=false",
                           f"encoder.cache_dir={tmp_path / 'two'}", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("train: 8 images x 1280 float32 (computed 9 in") == 1  # rank 0 reports the job
    for split, rows in (("train", 8), ("val", 5), ("test", 4)):
        one, two = (json.loads((tmp_path / d / f"efficientnet_lite0_{split}.json").read_text()) for d in ("one", "two"))
        assert two == one and two["rows"] == rows
        np.testing.assert_allclose(np.load(tmp_path / "two" / f"efficientnet_lite0_{split}.npy"),
                                   np.load(tmp_path / "one" / f"efficientnet_lite0_{split}.npy"), rtol=1e-6, atol=1e-6)
    skipped = json.loads((tmp_path / "two" / "efficientnet_lite0_train.json").read_text())["skipped"]
    assert [s["index"] for s in skipped] == [1]
    assert not list((tmp_path / "two").glob("*partial*"))
