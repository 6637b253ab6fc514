"""One live run per run directory: ``train.out_dir/run.lock``.

The lock file holds the host and pid of the run that owns the directory, and the owner keeps an
``flock`` on it while it runs. The kernel drops that ``flock`` when the process dies however it
dies, so a lock file whose ``flock`` can be taken was left by a run that no longer exists: it is
taken over with a warning line. A live owner makes a second run stop with one line naming it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("captioner.training.runlock")

LOCK_NAME = "run.lock"


class RunLockedError(RuntimeError):
    """Another live run owns the directory."""


def _flock(f, blocking: bool = False) -> bool:
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        return True
    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False


def _owner(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _refusal(out_dir: Path) -> RunLockedError:
    return RunLockedError(f"{out_dir} is in use by a live training run ({_owner(out_dir / LOCK_NAME)}): "
                          "wait for it to finish, or give this run another train.out_dir")


def check_free(out_dir: str | Path) -> None:
    """RunLockedError when a live run owns ``out_dir``; changes nothing (a look before Hydra writes
    its log and config there)."""
    path = Path(out_dir) / LOCK_NAME
    if not path.is_file():
        return
    with open(path, "a") as f:
        if not _flock(f):
            raise _refusal(Path(out_dir))


class RunLock:
    """``with RunLock(out_dir):`` owns ``out_dir`` for the block (created if needed)."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._file: Optional[object] = None

    def __enter__(self) -> "RunLock":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stale = self.path.is_file()
        f = open(self.path, "a+")
        if not _flock(f):
            f.close()
            raise _refusal(self.out_dir)
        if stale and self.path.stat().st_size:
            log.warning("%s: taking over a lock left by a run that no longer exists (%s)", self.out_dir,
                        _owner(self.path))
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self.path.unlink(missing_ok=True)  # while still holding the flock: no one can take it half-released
            self._file.close()
            self._file = None
