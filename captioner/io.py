"""Atomic file writes: a crash or a full disk mid-write never leaves a truncated file where a
good one was, and a failed write is one ``WriteError`` naming the file and the reason."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator


_UMASK = os.umask(0)
os.umask(_UMASK)


class WriteError(OSError):
    """A file that could not be written (no space left, permission denied, read-only file
    system); whatever was at its path before is intact."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"cannot write {path}: {reason}; the previous file, if any, is intact")
        self.path = str(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; give them the usual mode
        yield tmp
        with open(tmp, "rb") as f:  # the data must be on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as err:
        raise WriteError(path, err.strerror or str(err)) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def markdown_text(text: object) -> str:
    """``text`` for a Markdown document (a table cell, TensorBoard's text tab), shown literally: on
    one line, a "|" cannot split a table row, and HTML is shown, never run, by a renderer that
    keeps HTML."""
    import html

    text = html.escape(" ".join(str(text).split()), quote=False)
    return text.replace("\\", "\\\\").replace("|", "\\|")


def read_json(path: str | os.PathLike, what: str = "JSON file"):
    """The parsed contents of ``path``; a missing, unreadable or malformed file is one error that
    names the file (``what`` says which file it is meant to be)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {err.start}): is it the right file?") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") \
            from None
    except RecursionError:  # (json's C parser recurses once per level of nesting)
        raise ValueError(f"{what} {path} nests its values too deeply to be a captions or results file") from None
