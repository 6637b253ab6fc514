"""python -m captioner.train [overrides]: train a captioner (``captioner.training.trainer.train``) on the
config Hydra composes from conf/train.yaml; ``torchrun ... -m captioner.train`` for several
processes. A config mistake or a known error is one line on stderr and exit status 1;
SIGINT/SIGTERM save ``last.pt`` and exit with 130/143."""
from __future__ import annotations

from captioner.cli import command
from captioner.config import run_dir
from captioner.training.rundir import check_writable, claim
from captioner.training.runlock import check_free
from captioner.training.trainer import train


def _run_dir_is_free(cfg) -> None:
    """A second run on the directory of a live one, or a fresh run on a directory that holds a
    run, stops before Hydra writes its log and config there (train.overwrite=true moves the old
    run aside first)."""
    directory = run_dir(cfg.train.out_dir, cfg.train.resume)
    if directory:
        check_writable(directory)
        check_free(directory)
        claim(directory, cfg.train.resume, cfg.train.overwrite)


def _train(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN and cfg.train.out_dir is not None:
        raise ValueError("train.out_dir names one directory for every job of a sweep (-m): leave it out, each job "
                         "runs in hydra.sweep.dir/<its overrides>")
    if cfg.train.out_dir is None:  # Hydra's run directory: train.out_dir, the resumed run's, or a dated one
        cfg.train.out_dir = hydra_cfg.runtime.output_dir
    train(cfg)


main = command("train", _train, preflight=_run_dir_is_free)

if __name__ == "__main__":
    main()
