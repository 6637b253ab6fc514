"""Training options: mixed precision, torch.compile, the fused Adam; and that a step's cost
follows real tokens (the output layer runs on real targets only)."""
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from captioner.training import precision as precision_module
from captioner.training.engine import train_one_epoch
from captioner.models.show_tell import ShowTell
from captioner.data.batches import Batch
from captioner.training.optim import adam_options
from captioner.training.precision import PRECISIONS, Precision, compile_loss
from captioner.data.vocab import BOS_ID, EOS_ID, PAD_ID

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_train  # noqa: E402
from conftest import cross_entropy_loss

V, D = 60, 16
# Autocast changes the loss of a fresh model by ~1e-4 relative here (bf16 keeps 8 bits of
# mantissa, but the loss is a mean over many tokens and the cross-entropy runs in float32);
# a skipped or mis-scaled step moves it by several percent.
LOSS_RTOL = 5e-3


def _batch(seed=1, batch=8, length=9):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, D, generator=g)
    tokens = torch.randint(4, V, (batch, length), generator=g)
    tokens[:, 0] = BOS_ID
    tokens[:, -1] = EOS_ID
    tokens[2, 5], tokens[2, 6:] = EOS_ID, PAD_ID  # a shorter caption
    return features, tokens


def _train(precision: str, cell="lstm", steps=5, compiled=False, adam=None):
    torch.manual_seed(0)
    model = ShowTell(V, D, embed_dim=24, hidden_dim=32, dropout=0.0, cell=cell)
    if compiled:
        compile_loss(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, **(adam_options("cpu") if adam is None else adam))
    amp = Precision(precision, "cpu")
    features, tokens = _batch()
    batch = Batch(features, tokens, torch.arange(len(features)))
    losses = [train_one_epoch(model, optimizer, None, [batch], "cpu", grad_clip=1.0, precision=amp)[0]
              for _ in range(steps)]
    return losses, model, amp


def _assert_close_to_fp32(losses, reference):
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # it trains
    for got, want in zip(losses, reference):
        assert got == pytest.approx(want, rel=LOSS_RTOL)


def test_unknown_precision_is_one_clear_error():
    from conftest import compose_config

    from captioner.config import validate

    with pytest.raises(ValueError, match="train.precision='half': choose one of fp32, bf16, fp16"):
        validate(compose_config("train", ["train.precision=half"]))


# oneDNN's bfloat16 LSTM needs AVX-512: x86 CPUs with AVX2 only refuse bf16 up front
CPU_BF16 = precision_module._autocast_works("cpu", torch.bfloat16)
needs_cpu_bf16 = pytest.mark.skipif(not CPU_BF16, reason="this CPU has no bfloat16 LSTM in oneDNN (needs AVX-512)")


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_reduced_precision_on_cpu_trains_like_fp32_or_is_refused_up_front(name):
    if precision_module._autocast_works("cpu", PRECISIONS[name]):
        reference, *_ = _train("fp32")
        losses, model, amp = _train(name)
        _assert_close_to_fp32(losses, reference)
        assert (amp.scaler is not None) == (name == "fp16")
        assert all(p.dtype == torch.float32 for p in model.parameters())
    else:  # no such LSTM on this CPU: refused before any data is read, with what to use instead
        with pytest.raises(ValueError, match=f"train.precision={name} is not supported on this cpu .* "
                                             "Use train.precision=fp32 here"):
            Precision(name, "cpu")


def test_an_unsupported_precision_is_refused_in_one_line(monkeypatch):
    """What a CPU without a bfloat16 LSTM prints, checked on every CPU."""
    monkeypatch.setattr(precision_module, "_autocast_works", lambda *args: False)
    with pytest.raises(ValueError) as err:
        Precision("bf16", "cpu")
    message = str(err.value)
    assert "\n" not in message and "no bfloat16 LSTM" in message and "train.precision=fp32" in message


def test_fp16_loss_scaling_path(monkeypatch):
    """The GradScaler path (scale, unscale before clipping, step, update) on CPU, with a GRU
    decoder, which CPU autocast leaves in float32, so it runs even where the LSTM cannot."""
    monkeypatch.setattr(precision_module, "_autocast_works", lambda *args: True)
    reference, *_ = _train("fp32", cell="gru")
    losses, _, amp = _train("fp16", cell="gru")
    _assert_close_to_fp32(losses, reference)
    state = amp.state_dict()
    assert state["scale"] == 2.0**16 and state["_growth_tracker"] == 5  # no step was skipped
    fresh = Precision("fp16", "cpu")
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state


@needs_cpu_bf16
def test_every_inject_and_cell_runs_under_bf16():
    from captioner.models.show_tell import CELLS, INJECT_MODES

    features, tokens = _batch()
    for inject in INJECT_MODES:
        for cell in CELLS:
            torch.manual_seed(0)
            model = ShowTell(V, D, embed_dim=8, hidden_dim=12, num_layers=2, cell=cell, inject=inject)
            with Precision("bf16", "cpu").autocast():
                loss, _ = cross_entropy_loss(model, features, tokens)
            loss.backward()
            assert loss.dtype == torch.float32 and torch.isfinite(loss), (inject, cell)


def test_fused_adam_matches_the_per_tensor_adam():
    assert adam_options("cpu") == {"fused": True}  # torch >= 2.4 has a fused CPU Adam
    fused, model_a, _ = _train("fp32")
    loop, model_b, _ = _train("fp32", adam={"foreach": False})
    assert fused == pytest.approx(loop, rel=1e-5)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compile_loss_keeps_the_checkpoint_names_and_eager_decoding(monkeypatch):
    model = ShowTell(V, D, embed_dim=8, hidden_dim=12)
    names = list(model.state_dict())
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the wiring only; the real one is slow below
    compile_loss(model)
    assert list(model.state_dict()) == names and "teacher_forced" in vars(model)
    assert "step" not in vars(model)  # decoding keeps the eager one-step function


@pytest.mark.slow
def test_compiled_training_matches_eager():
    """torch.compile on CPU (inductor, a C++ compiler): a minute or more on a busy 2-core machine."""
    reference, *_ = _train("fp32", steps=3)
    losses, model, _ = _train("fp32", steps=3, compiled=True)
    for got, want in zip(losses, reference):
        assert got == pytest.approx(want, rel=1e-4)
    assert not any(name.startswith("_orig_mod") for name in model.state_dict())


def test_output_layer_runs_on_real_tokens_only():
    """Counted matmul FLOPs of loss + backward: image projection (forward and weight gradient)
    and the output layer over the real targets only (three GEMMs); the LSTM is not counted by
    FlopCounterMode. Padding columns added to the batch change nothing."""
    E, H, B = 8, 12, 8
    model = ShowTell(V, D, embed_dim=E, hidden_dim=H)
    features, tokens = _batch(batch=B)
    padded = torch.cat([tokens, torch.full((B, 5), PAD_ID)], dim=1)
    n_real = int((tokens[:, 1:] != PAD_ID).sum())
    assert n_real < tokens[:, 1:].numel()
    for batch_tokens in (tokens, padded):
        with FlopCounterMode(display=False) as counter:
            loss, n = cross_entropy_loss(model, features, batch_tokens)
            loss.backward()
        assert n == n_real
        assert counter.get_total_flops() == 2 * (2 * B * D * E) + 3 * (2 * n_real * H * V)


def test_bench_train_smoke():
    rows = bench_train.run(["--vocab", "50", "--embed", "8", "--hidden", "12", "--feature", "16", "--batch", "6",
                            "--repeats", "1", "--precision", "fp32,bf16", "--threads", "1"])
    cases = [r["case"] for r in rows]
    assert cases[:3] == ["mixed 8-16 | fp32", "all 8 | fp32", "all 16 | fp32"] and cases[3].startswith("matmul")
    # four rows per precision this CPU runs (bf16 is skipped, with a line saying why, where it cannot)
    assert len(rows) == (8 if CPU_BF16 else 4) and all(r["seconds"] > 0 and r["gflops"] > 0 for r in rows)
    assert rows[1]["real_tokens"] == 6 * 9 and rows[2]["real_tokens"] == 6 * 17
    assert "pct_of_all_long" in rows[1] and "pct_of_matmul" in rows[0]
    # the analytic count agrees with the formula the docstring states
    expected = 3 * (2 * 6 * 16 * 8 + (6 + 54) * 2 * (8 + 12) * 4 * 12 + 2 * 54 * 12 * 50)
    assert bench_train.step_flops(6, 54, 16, 8, 12, 50) == expected


def test_train_entry_point_takes_the_options(tiny_cfg):
    """train.precision reaches the step through captioner.train (bf16 on CPU where the CPU has a
    bfloat16 LSTM, refused at start-up where it has not), and a bad value fails with one clear error."""
    from captioner.training.trainer import train

    if CPU_BF16:
        final = train(tiny_cfg("train.precision=bf16", "train.epochs=1", "train.max_steps=2", "train.plot=false"))
        assert final["step"] == 2
    else:
        with pytest.raises(ValueError, match="train.precision=bf16 is not supported on this cpu"):
            train(tiny_cfg("train.precision=bf16", "train.epochs=1", "train.max_steps=1"))
    with pytest.raises(ValueError, match="train.precision='fp8'"):
        train(tiny_cfg("train.precision=fp8", "train.epochs=1", "train.max_steps=1"))


def test_an_unsupported_precision_fails_before_the_data_is_read(tiny_cfg, tmp_path, monkeypatch):
    """A precision this machine cannot run is refused at start-up, not after minutes of feature
    extraction: here the data folder does not even exist, and the precision is what is named."""
    from captioner.training.trainer import train

    monkeypatch.setattr(precision_module, "_autocast_works", lambda *args: False)
    with pytest.raises(ValueError, match="train.precision=bf16 is not supported"):
        train(tiny_cfg("data=flickr8k", f"data.root={tmp_path / 'absent'}", "train.precision=bf16"))
