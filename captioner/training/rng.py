"""Every random stream a training process draws from, as plain data (Python's as a list of ints,
NumPy's as a list, torch's as tensors), so a checkpoint that holds them loads with
``weights_only=True`` and a resumed run draws what the uninterrupted one would have."""
from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch


def rng_state(device: Optional[torch.device] = None) -> dict[str, Any]:
    """The Python, NumPy, torch CPU (and this process's CUDA device) RNG states as plain data."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: Optional[torch.device] = None) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
