"""python -m captioner.compare DIR [DIR ...] [--out PREFIX]: one table of the training runs under
the given directories (a sweep's, a few runs', or one run's).

A run is a directory holding ``metrics.jsonl`` and Hydra's ``.hydra/config.yaml``. Runs whose
configs differ only in ``train.seed`` (and in where and how they ran: paths, resume, progress,
logging) are one setting; runs started from different ``train.init_from`` checkpoints are
different settings. The table has a row per setting, named by the config values that differ
between settings, with the mean and standard deviation over its runs of each figure and the
number of runs; a figure that only some of the runs have says over how many its mean is
("0.5120 ± 0.0040 (2 of 3)"). Figures: the validation metrics of each run's best epoch (by its
``train.monitor``), and the scores and diversity figures (``test_beam/distinct_2``) of any
``metrics_<split>_<decode>.json`` that ``captioner.evaluate`` wrote in the run directory; BLEU-4 and CIDEr of each unless ``--figures``
names others. A training run directory without a finished epoch (no or an empty
``metrics.jsonl``), or a ``metrics.jsonl`` without its config, is left out with one line on
stderr saying why. Writes ``PREFIX.md`` and ``PREFIX.csv`` with the same table and
``PREFIX.png`` with every setting's validation curve (of the metric most runs monitor), the mean
over seeds with the spread of the runs shaded. PREFIX defaults to ``<first DIR>/comparison``.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from captioner.io import markdown_text

# config keys that say where or how a run ran, not what it computed (train.init_from is not one:
# the checkpoint a run starts from is part of what it computes)
BOOKKEEPING = ("train.seed", "train.out_dir", "train.resume", "train.progress", "train.log_every",
               "train.save_every", "train.plot", "train.tensorboard", "train.device", "data.root",
               "encoder.cache_dir", "encoder.num_workers", "encoder.compile")


@dataclass
class Run:
    path: Path
    config: dict[str, object]  # flattened: "model.inject" -> "every_step"
    history: list[dict]
    figures: dict[str, float] = field(default_factory=dict)


@dataclass
class Setting:
    name: str
    runs: list[Run]

    def stats(self, figure: str) -> tuple[Optional[float], Optional[float]]:
        values = [r.figures[figure] for r in self.runs if figure in r.figures]
        if not values:
            return None, None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _flatten(node, prefix: str = "") -> dict[str, object]:
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    out: dict[str, object] = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


class LeftOut(Exception):
    """A run directory with nothing to tabulate yet; the message says why."""


def _json(text: str, path: Path, line: Optional[int] = None):
    """``text`` (line ``line`` of ``path``, or all of it) parsed; json's own error names neither
    the file nor, for one line of a .jsonl, the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {line or err.lineno}: not JSON ({err.msg}, column {err.colno})") from None


MAX_CONFIG_BYTES = 1 << 20  # a Hydra config of a run is a few KB


def read_config(path: Path):
    """A Hydra YAML file of a run, read safely: plain data only (safe_load), at most
    ``MAX_CONFIG_BYTES``, and no anchors or aliases, which Hydra never writes and which let a
    kilobyte of YAML expand to gigabytes (an "alias bomb"): LeftOut naming the file otherwise."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):
                raise LeftOut(f"{path} uses YAML anchors or aliases, which Hydra never writes")
            return super().compose_node(parent, index)

    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise LeftOut(f"{path} is {path.stat().st_size} bytes, not a run's config")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=NoAliases)  # noqa: S506 - a safe loader
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as err:
        raise LeftOut(f"{path} is not a readable YAML config ({type(err).__name__})") from None


def is_training_job(path: Path) -> bool:
    """Whether Hydra's config in ``path`` is a training job's: ``captioner.extract`` composes the
    same config into its own run directories, which never have epochs."""
    hydra_file = path / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return True
    try:
        job = (read_config(hydra_file) or {}).get("hydra", {}).get("job", {})
    except LeftOut:
        return True  # load_run then says what is wrong with the run
    return job.get("name", "train") == "train"


def load_run(path: Path) -> Run:
    """The run in ``path``; LeftOut when it has no finished epoch or no config."""
    config_file = path / ".hydra" / "config.yaml"
    metrics = path / "metrics.jsonl"
    if not config_file.is_file():
        raise LeftOut("no .hydra/config.yaml beside its metrics.jsonl (its settings are unknown)")
    if not metrics.is_file():
        raise LeftOut("no metrics.jsonl (no epoch finished)")
    history = [_json(line, metrics, number)
               for number, line in enumerate(metrics.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if not history:
        raise LeftOut("metrics.jsonl is empty (no epoch finished)")
    config = read_config(config_file)
    if not isinstance(config, dict):
        raise LeftOut(f"{config_file} is not a mapping of settings")
    config = _flatten(config)
    monitor = f"val/{config.get('train.monitor', 'Bleu_4')}"
    best = max((row for row in history if monitor in row), key=lambda row: row[monitor], default=history[-1])
    figures = {k: v for k, v in best.items() if k.startswith("val/") and isinstance(v, (int, float))}
    figures["epochs"] = float(history[-1]["epoch"])
    for scores in sorted(path.glob("metrics_*_*.json")):  # captioner.evaluate: metrics_<split>_<decode>.json
        split_decode = scores.stem.removeprefix("metrics_")
        report = _json(scores.read_text(encoding="utf-8"), scores)
        for name, value in {**report.get("scores", {}), **report.get("diversity", {})}.items():
            if isinstance(value, (int, float)):
                figures[f"{split_decode}/{name}"] = float(value)
    return Run(path, config, history, figures)


def find_runs(directories: Sequence[Path]) -> tuple[list[Run], list[tuple[Path, str]]]:
    """The runs under ``directories`` and the run directories left out, each with the reason.
    A directory is a run's when it has a metrics.jsonl or a training job's .hydra/config.yaml."""
    runs, left_out = [], []
    for directory in directories:
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: no such directory")
        candidates = sorted({p.parent for p in directory.rglob("metrics.jsonl")}
                            | {p.parent.parent for p in directory.rglob(".hydra/config.yaml")})
        for path in candidates:
            if not (path / "metrics.jsonl").is_file() and not is_training_job(path):
                continue
            try:
                runs.append(load_run(path))
            except LeftOut as why:
                left_out.append((path, str(why)))
    if not runs:
        raise FileNotFoundError(f"no training runs (a metrics.jsonl beside .hydra/config.yaml) under "
                                f"{', '.join(map(str, directories))}"
                                + "".join(f"; {path} left out: {why}" for path, why in left_out))
    return runs, left_out


def settings(runs: Sequence[Run]) -> list[Setting]:
    """Runs grouped by their config without the bookkeeping keys; each named by the keys whose
    values differ between the groups (in the order of the first run that has them).

    A key that some runs lack (a run made before the option existed, or an option of one
    objective only) separates runs only where the runs that have it disagree: one value among
    them is taken as what the others ran with, so a seed added to an older sweep joins its row."""
    configs = [{k: repr(v) for k, v in run.config.items() if not k.startswith(BOOKKEEPING)} for run in runs]
    every_key = dict.fromkeys(k for config in configs for k in config)
    distinguishing = [k for k in every_key
                      if all(k in config for config in configs)
                      or len({config[k] for config in configs if k in config}) > 1]

    groups: dict[tuple, list[Run]] = {}
    for run, config in zip(runs, configs):
        groups.setdefault(tuple((k, config[k]) for k in distinguishing if k in config), []).append(run)
    keys = [dict(k) for k in groups]
    # a key names settings where it takes two values or more among those that have it (an option
    # of one objective only is not a difference between its runs and another objective's)
    differing = [k for k in dict.fromkeys(name for g in keys for name in g)
                 if len({g[k] for g in keys if k in g}) > 1]
    named = []
    for group_key, members in groups.items():
        values = dict(group_key)
        name = (" ".join(f"{k}={members[0].config.get(k)}" for k in differing if k in values)
                or " ".join(f"{k} unset" for k in differing) or "(all runs)")
        named.append(Setting(name, members))
    return named


DEFAULT_FIGURES = ("Bleu_4", "CIDEr")  # of every split and decode: val/, test_beam/, ...


def table(groups: Sequence[Setting], figures: Optional[Sequence[str]] = None) -> tuple[list[str], list[list[str]]]:
    """The header and a row per setting; ``figures`` None: every split's BLEU-4 and CIDEr,
    "all": everything the runs have, else those names (e.g. val/METEOR)."""
    every = list(dict.fromkeys(f for g in groups for r in g.runs for f in r.figures if f != "epochs"))
    if figures is None:
        figures = [f for f in every if f.rsplit("/", 1)[-1] in DEFAULT_FIGURES]
    elif list(figures) == ["all"]:
        figures = every
    header = ["setting", "runs", *figures]
    rows = []
    for g in groups:
        cells = [g.name, str(len(g.runs))]
        for figure in figures:
            mean, std = g.stats(figure)
            have = sum(figure in r.figures for r in g.runs)
            cells.append("-" if mean is None else f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}")
                         + ("" if have == len(g.runs) else f" ({have} of {len(g.runs)})"))
        rows.append(cells)
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(map(markdown_text, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(markdown_text, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(groups: Sequence[Setting], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from captioner.io import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4.5))
    monitors = [str(r.config.get("train.monitor", "Bleu_4")) for g in groups for r in g.runs]
    monitor = f"val/{max(set(monitors), key=monitors.count)}"  # one metric for every curve: the most monitored
    for g in groups:
        epochs = sorted({row["epoch"] for r in g.runs for row in r.history if monitor in row})
        per_epoch = [[row[monitor] for r in g.runs for row in r.history if row["epoch"] == e and monitor in row]
                     for e in epochs]
        mean = [statistics.fmean(v) for v in per_epoch]
        (line,) = ax.plot(epochs, mean, "o-", label=f"{g.name} ({len(g.runs)})")
        low, high = [min(v) for v in per_epoch], [max(v) for v in per_epoch]
        ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{monitor} (mean over runs; shaded: min to max)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1, frameon=False)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)


def compare(directories: Sequence[Path], prefix: Optional[Path] = None,
            figures: Optional[Sequence[str]] = None) -> tuple[str, list[Setting], list[tuple[Path, str]]]:
    """The Markdown table of the runs under ``directories``, also written (with the CSV and the
    curves) to ``prefix``.md/.csv/.png; the settings; the run directories left out, with why."""
    from captioner.io import atomic_write_text

    runs, left_out = find_runs([Path(d) for d in directories])
    groups = settings(runs)
    header, rows = table(groups, figures)
    text = markdown(header, rows)
    prefix = Path(prefix) if prefix else Path(directories[0]) / "comparison"
    atomic_write_text(prefix.with_suffix(".md"), text)
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    atomic_write_text(prefix.with_suffix(".csv"), buffer.getvalue())
    plot(groups, prefix.with_suffix(".png"))
    return text, groups, left_out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m captioner.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directories", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="prefix of the .md, .csv and .png written")
    parser.add_argument("--figures", default=None,
                        help="comma-separated columns (val/Bleu_4,test_beam/CIDEr,...) or all; "
                             "default: every split's Bleu_4 and CIDEr")
    args = parser.parse_args(argv)
    from captioner.cli import known_errors

    with known_errors():
        text, groups, left_out = compare(args.directories, args.out,
                                         args.figures.split(",") if args.figures else None)
    for path, why in left_out:
        print(f"left out {path}: {why}", file=sys.stderr)
    print(text, end="")
    prefix = args.out or args.directories[0] / "comparison"
    runs = sum(len(g.runs) for g in groups)
    skipped = f", {len(left_out)} run director{'ies' if len(left_out) != 1 else 'y'} left out" if left_out else ""
    print(f"{runs} run{'s' * (runs != 1)}, {len(groups)} setting{'s' * (len(groups) != 1)}{skipped}; "
          f"wrote {prefix}.md, .csv, .png")


if __name__ == "__main__":
    main(sys.argv[1:])
