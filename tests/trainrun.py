"""Helpers for the tests that run training as a user does: ``python -m captioner.train`` in a
subprocess (resume, faults, config errors, torchrun)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import pytest
import torch

from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def env(**extra: str) -> dict:
    """One thread per process (the machine is shared; also makes CPU float results reproducible)."""
    e = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return e


def command(shapes_root: Path, run_dir: Path, *overrides: str, module: Sequence[str] = ("-m", "captioner.train")):
    return [sys.executable, *module, *TINY, f"data.root={shapes_root}", f"hydra.run.dir={run_dir}", *overrides]


def run(shapes_root: Path, run_dir: Path, *overrides: str, timeout: float = 240,
        cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(shapes_root, run_dir, *overrides), cwd=cwd or run_dir.parent, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def start(shapes_root: Path, run_dir: Path, *overrides: str, cwd: Optional[Path] = None) -> subprocess.Popen:
    """A training run in the background; its log (stdout) and stderr merged, line by line."""
    return subprocess.Popen(command(shapes_root, run_dir, *overrides), cwd=cwd or run_dir.parent, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)


STEP_LINE = re.compile(r"\] - step (\d+) \|")


def wait_for_step(proc: subprocess.Popen, step: int, timeout: float = 240) -> tuple[int, list[str]]:
    """Read the run's log until it reports ``step`` or later; (the step seen, the lines read)."""
    lines, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        m = STEP_LINE.search(line)
        if m and int(m.group(1)) >= step:
            return int(m.group(1)), lines
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError(f"the run never reached step {step}:\n{''.join(lines[-30:])}")


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def error_lines(stderr: str) -> list[str]:
    """stderr without the log lines and warnings of the run: what the user is told at the end."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("[")]


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "HYDRA_FULL_ERROR" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def one_thread():
    """One torch thread in this process for the test (the 2 shared cores thrash with more), and
    the same float results as the one-thread subprocesses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
