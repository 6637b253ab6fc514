"""The one shape of every command: a Hydra entry over a library function, and one wrapper that
turns every user-fixable error into one line on stderr and an exit code, never a traceback.

``main = command("train", train)`` in ``captioner/train.py`` is all an entry point is. Before
Hydra starts, the command line is composed the way Hydra will compose it and checked: a
misspelled key, a wrong type, a missing config option or a value out of range (``validate``) is
one line naming the key (Hydra's own report is several lines and a hint about
HYDRA_FULL_ERROR), before any data, extraction or model work. Then the library function runs
inside ``known_errors()``.

Exit codes: 0 done; 1 a known error (``error: ...`` on stderr); 128 + signal number when a run
was stopped by SIGINT (130) or SIGTERM (143) after saving its checkpoint. ``HYDRA_FULL_ERROR=1``
shows the full traceback instead, as it does for Hydra's own errors.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import signal
import sys
from typing import Any, Callable, Iterator, Optional, Sequence

from captioner.config import CONF_DIR, CaptionRunConfig, DemoRunConfig, EvaluateRunConfig, TrainRunConfig, validate
from captioner.encoding.encoders import WeightsUnavailableError
from captioner.models import MODELS
from captioner.objectives import OBJECTIVES
from captioner.registry import ContractError
from captioner.runtime import Interrupted
from captioner.training.checkpoint import CheckpointError
from captioner.training.runlock import RunLockedError


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line: its lines joined with '; ' (after a colon, a space)."""
    text = str(err).strip()
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    out = ""
    for line in (line.strip() for line in text.splitlines()):
        if line:
            out += ("" if not out else " " if out.endswith(":") else "; ") + line
    return out or type(err).__name__


def print_error(message: str) -> None:
    rank = _rank()
    prefix = f"[rank {rank}] " if rank else ""
    print(f"error: {prefix}{message}", file=sys.stderr, flush=True)


class UsageError(RuntimeError):
    """A command given too little to work on (no folder, no checkpoint); the message says what to add."""


# Errors a user can fix from the message alone: bad paths, unreadable or unwritable files (a full
# disk), bad data, bad checkpoints, bad values, weights that cannot be had, a run directory in use.
def _known() -> tuple[type[BaseException], ...]:
    return (OSError, CheckpointError, WeightsUnavailableError, RunLockedError, UsageError, ValueError,
            FloatingPointError, ContractError)


def register_configs() -> None:
    """Every schema in Hydra's ConfigStore: the commands' and each registered model's and
    objective's (``<group>/<name>_schema``, which its YAML extends). Loading the registries
    imports every model and objective module, so a class that breaks its contract fails here."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainRunConfig)
    store.store(name="evaluate_schema", node=EvaluateRunConfig)
    store.store(name="caption_schema", node=CaptionRunConfig)
    store.store(name="demo_schema", node=DemoRunConfig)
    MODELS.store_schemas(store)
    OBJECTIVES.store_schemas(store)


# What to lower when a command runs out of memory.
MEMORY_KEYS = {"train": "train.batch_size or encoder.batch_size", "extract": "encoder.batch_size",
               "evaluate": "decode.beam_size or decode.batch_size", "caption": "decode.beam_size or decode.batch_size"}


def out_of_memory(err: BaseException) -> Optional[str]:
    """The size an allocation that failed asked for ("2.8 GiB"; "" when not said), or None when
    ``err`` is not a failed allocation (torch reports a CPU one as a plain RuntimeError)."""
    import re

    import torch

    if not isinstance(err, (MemoryError, torch.OutOfMemoryError)) and not (
            isinstance(err, RuntimeError) and "can't allocate memory" in str(err)):
        return None
    asked = re.search(r"allocate (\d+) bytes|allocate ([\d.]+ [KMGT]iB)", str(err))
    if asked is None:
        return ""
    return asked.group(2) or f"{int(asked.group(1)) / 2**30:.1f} GiB"


@contextlib.contextmanager
def known_errors(config_name: str = "") -> Iterator[None]:
    """Turn the known errors raised inside into ``error: ...`` + exit 1, a signal into 128 + signum,
    a failed allocation into one line naming what to lower."""
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        yield
    except Interrupted as err:
        if _rank() == 0:
            print(str(err), file=sys.stderr, flush=True)
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt:
        if full:
            raise
        if _rank() == 0:
            print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGINT) from None
    except _known() as err:
        if full:
            raise
        print_error(one_line(err))
        raise SystemExit(1) from None
    except (MemoryError, RuntimeError) as err:
        asked = out_of_memory(err)
        if full or asked is None:
            raise
        lower = MEMORY_KEYS.get(config_name, "the batch and beam sizes")
        print_error(f"out of memory{f' (an allocation of {asked} failed)' if asked else ''}: lower {lower}")
        raise SystemExit(1) from None


# --- config checking ---------------------------------------------------------------------

def _unknown_keys(node, prefix: str = "") -> Iterator[tuple[str, list[str], str]]:
    """(full key, the allowed keys, schema name) for every key a dataclass schema does not declare
    (Hydra lets ``+group.key=value`` add one to a structured node)."""
    from dataclasses import fields, is_dataclass

    from omegaconf import DictConfig, OmegaConf

    schema = OmegaConf.get_type(node)
    allowed = [f.name for f in fields(schema)] if schema is not None and is_dataclass(schema) else None
    for key in node.keys():
        if allowed is not None and key not in allowed:
            yield f"{prefix}{key}", allowed, schema.__name__
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            yield from _unknown_keys(child, f"{prefix}{key}.")


def _did_you_mean(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(allowed), n=1)
    return f"; did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}?" if close else ""


def describe_config_error(err: BaseException) -> str:
    """One line for a Hydra/OmegaConf composition error, naming the key."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    full_key = getattr(cause, "full_key", None)
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if isinstance(err, MissingConfigException) and getattr(err, "missing_cfg_file", None):
        group, _, name = str(err.missing_cfg_file).rpartition("/")
        options = getattr(err, "options", None)
        choices = f" (choose {', '.join(options)})" if options else ""
        return f"no config {name!r} in group {group!r}{choices}" if group else f"no config {name!r}{choices}"
    if full_key and isinstance(cause, (ConfigKeyError, AttributeError)) and "not in" in first:
        schema = getattr(cause, "object_type", None)
        allowed = [f for f in getattr(schema, "__dataclass_fields__", {})]
        return f"unknown config key '{full_key}' ({first}{_did_you_mean(full_key, allowed)})"
    if full_key and isinstance(cause, ValidationError):
        return f"bad value for '{full_key}': {first}"
    if full_key:
        return f"'{full_key}': {first}"
    if first.startswith("Ambiguous value"):
        return f"{first} (a list is key=[a,b], a string key='a,b', a sweep needs --multirun)"
    return one_line(err)


def check_config(config_name: str, argv: Sequence[str],
                 preflight: Optional[Callable[[Any], None]] = None) -> Optional[str]:
    """Compose ``config_name`` with the command-line overrides as Hydra will and validate it;
    None when it is fine, else one line naming the problem. ``preflight(cfg)`` adds a command's
    own check (a known error it raises is the line). Runs with Hydra flags (--multirun, --cfg,
    ...) are left to Hydra."""
    if any(arg.startswith("-") for arg in argv):  # Hydra's own flags: --multirun, --cfg, --help, ...
        return None
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in argv:
        try:
            parser.parse_overrides([arg])
        except Exception as err:  # noqa: BLE001 - OverrideParseException and friends
            return f"cannot parse override {arg!r}: {one_line(err).split('; See https://')[0]}"
    try:
        register_configs()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name, overrides=list(argv))
    except Exception as err:  # noqa: BLE001 - everything Hydra/OmegaConf raise here is a config error
        return describe_config_error(err)
    finally:
        GlobalHydra.instance().clear()
    for key, allowed, schema in _unknown_keys(cfg):
        return f"unknown config key '{key}' ({schema} has no such field{_did_you_mean(key, allowed)})"
    try:
        validate(cfg)
        if preflight is not None:
            preflight(cfg)
    except _known() as err:
        return one_line(err)
    return None


def command(config_name: str, work: Callable[[Any], Any], *, preflight: Optional[Callable[[Any], None]] = None,
            argv_hook: Optional[Callable[[list[str]], list[str]]] = None) -> Callable[..., None]:
    """The ``main()`` of a command: ``work(cfg)`` on the config ``conf/<config_name>.yaml``
    composes with the command line. ``argv_hook`` rewrites the command line first (e.g. a bare
    folder argument into ``folder=...``); ``preflight(cfg)`` runs with the config checks."""
    import hydra

    with known_errors():
        register_configs()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def hydra_main(cfg) -> None:
        with known_errors(config_name):
            work(cfg)

    def main(argv: Optional[Sequence[str]] = None) -> None:
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv_hook is not None:
            with known_errors():
                argv = argv_hook(argv)
        sys.argv = [sys.argv[0], *argv]
        run(hydra_main, config_name, argv, preflight)

    return main


def run(hydra_main: Callable[[], None], config_name: str, argv: Optional[Sequence[str]] = None,
        preflight: Optional[Callable[[Any], None]] = None) -> None:
    """Check the command line, then call the ``@hydra.main`` function (which reads ``sys.argv``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if os.environ.get("HYDRA_FULL_ERROR") != "1":
        problem = check_config(config_name, argv, preflight if _rank() == 0 else None)
        if problem:
            print_error(problem)
            raise SystemExit(1)
    if _rank() != 0:
        # Only rank 0 writes: the others neither save Hydra's .hydra/ files nor open a log file
        # nor create a run directory of their own (their ${now:...} may differ from rank 0's).
        extra = ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
        if not any(a.startswith("hydra.run.dir=") for a in argv):
            extra.append("hydra.run.dir=.")
        sys.argv = [sys.argv[0], *argv, *extra]
    hydra_main()
