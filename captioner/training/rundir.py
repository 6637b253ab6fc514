"""What a run directory holds, and whether a fresh run may write there.

A directory that holds a run (its ``last.pt``, ``best.pt`` or ``metrics.jsonl``), finished or
interrupted, is never written over by a fresh run: the run stops with one line naming
``train.resume=auto`` (go on with it) and ``train.overwrite=true`` (start over), and the latter
moves what was there into ``<dir>/replaced-<date_time>/`` rather than deleting it. The check runs
before Hydra writes its log and config into the directory (the train command's preflight) and
again when a run is prepared (for library callers).
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

from captioner.training.resume import resume_requested

log = logging.getLogger("captioner.training.rundir")

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")  # any of them: a run has written here
REPLACED = "replaced-"


class RunExistsError(ValueError):
    """A fresh run pointed at a directory that holds another run."""


def check_writable(out_dir: str | Path) -> None:
    """A run directory that can be made and written to, or one line saying why not: a path that is
    a file, a read-only file system, no permission (before Hydra tries, with a traceback)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunExistsError(f"train.out_dir={out_dir} is a file, not a directory: give a directory for the run")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as err:
        raise RunExistsError(f"train.out_dir={out_dir} cannot be written ({err.strerror or err}): "
                             "give a directory on a writable disk") from None


def holds_run(out_dir: Path) -> Optional[str]:
    """The first file that shows ``out_dir`` holds a run, or None."""
    for name in RUN_FILES:
        path = out_dir / name
        if path.is_file() and path.stat().st_size > 0:
            return name
    return None


def claim(out_dir: str | Path, resume: Optional[str], overwrite: bool, keep: Iterable[str] = ()) -> None:
    """Make sure a run starting in ``out_dir`` loses nobody's work: a resumed run (``train.resume``
    given) goes on with what is there; a fresh one refuses a directory that holds a run
    (RunExistsError) or, with ``overwrite``, moves everything but ``keep`` (and the lock, and
    earlier replaced folders) aside first."""
    out_dir = Path(out_dir)
    if resume_requested(resume) or not out_dir.is_dir():
        return
    found = holds_run(out_dir)
    if found is None:
        return
    if not overwrite:
        raise RunExistsError(f"train.out_dir={out_dir} holds a run ({found}): go on with it with train.resume=auto, "
                             f"or start over with train.overwrite=true (its files move to {out_dir}/{REPLACED}<time>/), "
                             "or give another train.out_dir")
    aside = out_dir / f"{REPLACED}{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    while aside.exists():  # two restarts within a second
        aside = aside.with_name(aside.name + "_")
    aside.mkdir()
    kept = {*keep, "run.lock"}
    for entry in sorted(out_dir.iterdir()):
        if entry != aside and entry.name not in kept and not entry.name.startswith(REPLACED):
            entry.rename(aside / entry.name)
    log.warning("train.overwrite=true: the run that was in %s is now in %s", out_dir, aside)
