"""Training speed options: mixed precision (``train.precision``), ``torch.compile``
(``train.compile``).

- ``fp32``: no autocast.
- ``bf16``: autocast to bfloat16; no loss scaling (bfloat16 has float32's exponent range). On
  CUDA it needs a GPU with bfloat16 (Ampere or newer). On CPU it needs oneDNN's bfloat16 LSTM,
  which x86 CPUs with AVX-512 have (fast with AVX512-BF16 or AMX); CPUs with AVX2 only lack it.
- ``fp16``: autocast to float16 with a ``GradScaler`` (dynamic loss scaling). Meant for CUDA;
  oneDNN has no float16 LSTM on most CPUs.

On CPU a reduced precision is tried once at start-up on a tiny LSTM; where this CPU cannot run
it, it is refused with one clear error rather than failing at the first step.

Autocast leaves the weights, the optimizer state and the loss in float32 (the cross-entropy
runs in float32 under autocast on both devices).

``compile_loss`` compiles the model's training function ``loss`` in place, so checkpoints keep
their plain parameter names and decoding keeps the eager ``step``. Dynamo does not trace
``nn.LSTM``: the recurrent net stays one fused cuDNN/oneDNN call and the graph breaks around
it; the projection, the gather and the output layer with its cross-entropy are compiled.
"""
from __future__ import annotations

import os
import shutil
import warnings
from contextlib import AbstractContextManager
from typing import Iterable, Optional

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether autocast to ``dtype`` really runs the decoder's ops (a tiny LSTM and a linear
    layer, forward and backward) on this device."""
    # fork_rng: the probe's random weights must not shift the caller's seeded random stream
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")  # older torch warns and disables autocast instead of raising
        try:
            lstm = torch.nn.LSTM(8, 8, batch_first=True).to(device_type)
            linear = torch.nn.Linear(8, 8).to(device_type)
            x = torch.randn(2, 3, 8, device=device_type)
            with torch.autocast(device_type, dtype=dtype):
                out = linear(lstm(x)[0])
                ok = out.dtype == dtype
            out.float().sum().backward()
            return ok
        except (RuntimeError, NotImplementedError):
            return False


class Precision:
    """Autocast and (for fp16) loss scaling around one training step.

    ``train_one_epoch`` runs ``with precision.autocast(): out = objective(model, batch)``, then
    ``precision.backward(loss)`` and ``precision.step(optimizer, parameters, grad_clip)``.
    With ``fp32`` these are plain ``loss.backward()``, clipping and ``optimizer.step()``.
    """

    def __init__(self, name: str = "fp32", device: torch.device | str = "cpu"):
        self.name = name
        self.device_type = torch.device(device).type
        self.dtype: Optional[torch.dtype] = PRECISIONS[name]
        self.scaler = None
        if self.dtype is None:
            return
        if self.device_type == "cuda" and self.dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ValueError("train.precision=bf16: this GPU has no bfloat16 support; use fp16 or fp32")
        if self.device_type != "cuda" and not _autocast_works(self.device_type, self.dtype):
            dtype = str(self.dtype).removeprefix("torch.")
            raise ValueError(
                f"train.precision={name} is not supported on this {self.device_type} with torch "
                f"{torch.__version__} (oneDNN has no {dtype} LSTM for this processor; bfloat16 needs AVX-512, "
                "float16 is meant for CUDA). Use train.precision=fp32 here.")
        if self.dtype is torch.float16:
            self.scaler = torch.amp.GradScaler(self.device_type)

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer, parameters: Iterable[torch.Tensor], grad_clip: float = 0.0) -> None:
        """Clip (on unscaled gradients) and step; with fp16, a step whose gradients overflowed is
        skipped and the loss scale lowered, as ``GradScaler`` does."""
        if self.scaler is not None and grad_clip > 0:
            self.scaler.unscale_(optimizer)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    # the loss scale belongs in checkpoints for an exact resume (empty unless fp16)
    def state_dict(self) -> dict:
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    def __repr__(self) -> str:
        return f"Precision({self.name!r}, {self.device_type!r})"


def _cpu_flags() -> Optional[set[str]]:
    """The CPU's feature flags (Linux), or None where /proc/cpuinfo does not say."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def inference_dtype(name: str, device: torch.device | str, option: str = "encoder.precision") -> Optional[torch.dtype]:
    """The autocast dtype of a forward-only pass (feature extraction) in precision ``name``, or None
    for fp32. bf16 runs on CUDA GPUs with bfloat16 and on CPUs with AVX512-BF16 or AMX (elsewhere
    oneDNN emulates it, slower than fp32); fp16 on CUDA and on CPUs with AMX-FP16. Refused with
    one line elsewhere."""
    dtype = PRECISIONS[name]
    device = torch.device(device)
    if dtype is None:
        return None
    if device.type == "cuda":
        if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ValueError(f"{option}=bf16: this GPU has no bfloat16 support; use fp16 or fp32")
        return dtype
    flags = _cpu_flags()
    needs = {"avx512_bf16", "amx_bf16"} if dtype is torch.bfloat16 else {"amx_fp16"}
    if flags is not None and not needs & flags:
        raise ValueError(f"{option}={name}: this CPU lacks {' and '.join(sorted(needs))} "
                         f"(fast {str(dtype).removeprefix('torch.')} arithmetic); use {option}=fp32 here")
    if flags is None and device.type == "cpu" and not _autocast_works("cpu", dtype):
        raise ValueError(f"{option}={name} is not supported on this CPU; use {option}=fp32 here")
    return dtype


def has_cxx_compiler() -> bool:
    return any(shutil.which(c) for c in filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++")))


def compile_loss(model: torch.nn.Module, device: torch.device | str = "cpu", **options):
    """Compile ``model.teacher_forced`` in place (an instance attribute over the method: the
    teacher-forced pass every objective's loss goes through) and return the
    model. The first steps are slow (compiling; again for a new caption length until dynamo
    marks the length dynamic); later ones run the compiled graphs."""
    if torch.device(device).type == "cpu" and not has_cxx_compiler():
        raise ValueError("train.compile=true on CPU needs a C++ compiler (g++ or clang++, or set CXX)")
    model.teacher_forced = torch.compile(model.teacher_forced, **options)
    return model
