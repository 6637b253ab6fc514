"""The process a command runs in: its device, its random seeds, and how signals stop it."""
from __future__ import annotations

import logging
import random
import signal
import threading
import time
from typing import Optional

import numpy as np
import torch

log = logging.getLogger("captioner.runtime")


class Interrupted(Exception):
    """A run stopped by a signal; ``message`` says where it stopped and how to resume."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; an explicit CUDA device must exist."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use cpu or auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StopSignals:
    """SIGINT/SIGTERM while training ask the loop to stop at the next step boundary (``armed``),
    after saving ``last.pt``; before the loop (or a second signal more than 2 s later) they stop
    at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.armed = False
        self.phase = "before training started"  # said when a signal stops the run outside the loop
        self._first = 0.0
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not self.armed:
            raise Interrupted(signum, f"interrupted ({name}) {self.phase}")
        if self.signum is None:
            self.signum, self._first = signum, time.monotonic()
            log.warning("%s: stopping after this step, saving last.pt first (again to stop at once)", name)
        elif time.monotonic() - self._first > 2.0:  # quick repeats are a launcher passing it on
            raise Interrupted(signum, f"interrupted again ({name}): stopped without saving the current step")
