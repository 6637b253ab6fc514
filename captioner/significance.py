"""python -m captioner.significance A [B]: is A better than B on the same images, or only luckier?

    python -m captioner.significance outputs/flickr8k_scst outputs/flickr8k --results test_beam
    python -m captioner.significance a/results_test_beam.json b/results_test_beam.json
    python -m captioner.significance my_results.json --annotations captions_val2014.json

A and B are evaluated runs (a directory holding ``results_<TAG>.json``, with ``--results TAG``
when it holds several) or results files themselves. The references are those the evaluation
scored against (named by the ``metrics_<TAG>.json`` beside each results file), or
``--annotations FILE`` (a COCO captions file). With two, a Markdown table of BLEU-4, ROUGE-L and
CIDEr-D: each one's score, the difference A - B with its 95% paired-bootstrap interval and the
p-values of the paired bootstrap and of approximate randomization over images
(``captioner.evaluation.significance``); with one, each score's 95% bootstrap interval.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from captioner.evaluation.metrics import ImageId, read_references, read_results


def results_file(path: Path, tag: Optional[str]) -> Path:
    """``path`` itself, or its ``results_<tag>.json`` (the only one when ``tag`` is None)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such results file or run directory")
    if tag is not None:
        found = path / f"results_{tag}.json"
        if not found.is_file():
            raise FileNotFoundError(f"{path} holds no results_{tag}.json: run python -m captioner.evaluate "
                                    f"checkpoint={path}/best.pt first, or give --results another tag")
        return found
    found = sorted(path.glob("results_*.json"))
    if len(found) != 1:
        tags = ", ".join(f.stem.removeprefix("results_") for f in found) or "none"
        raise ValueError(f"{path} holds {len(found)} results files ({tags}): name one with --results TAG")
    return found[0]


def evaluated_references(results: Path) -> dict[ImageId, list[str]]:
    """The references ``captioner.evaluate`` scored ``results`` against: its data config (in the
    ``metrics_*.json`` beside it), read again without writing anything."""
    from omegaconf import OmegaConf

    from captioner.config import DataConfig
    from captioner.data import load_records
    from captioner.io import read_json

    metrics = results.with_name(results.name.replace("results_", "metrics_", 1))
    report = read_json(metrics, "metrics file") if metrics.is_file() else None
    if not isinstance(report, dict) or not isinstance(report.get("data_config"), dict):
        raise ValueError(f"{results}: no {metrics.name} with its data config beside it (evaluated before "
                         "captioner.evaluate recorded it, or not by it): give --annotations FILE")
    data = OmegaConf.merge(OmegaConf.structured(DataConfig), report["data_config"])
    records = load_records(data, generate=False).get(report.get("split", ""), [])
    if not records:
        raise ValueError(f"{metrics}: its data set has no images in split {report.get('split')!r} at "
                         f"data.root={data.root}: give --annotations FILE")
    return {r.image_id: list(r.captions) for r in records}


def references_for(files: Sequence[Path], annotations: Optional[Path]) -> dict[ImageId, list[str]]:
    if annotations is not None:
        return read_references(annotations)
    references = [evaluated_references(f) for f in files]
    if any(r != references[0] for r in references[1:]):
        raise ValueError(f"{files[0]} and {files[1]} were scored against different references: a paired test "
                         "compares captions of the same images")
    return references[0]


def table(files: Sequence[Path], references, resamples: int, seed: int, tokenizer: str) -> str:
    from captioner.evaluation.significance import intervals, paired_test
    from captioner.io import markdown_text

    systems = [read_results(f) for f in files]
    names = [markdown_text(str(f)) for f in files]
    if len(systems) == 1:
        rows = intervals(references, systems[0], resamples, seed, tokenizer)
        lines = [f"{names[0]}, {resamples} bootstrap resamples", "",
                 "| metric | score | 95% interval |", "|---|---|---|"]
        lines += [f"| {r.metric} | {r.score:.4f} | [{r.low:.4f}, {r.high:.4f}] |" for r in rows]
        return "\n".join(lines) + "\n"
    rows = paired_test(references, systems[0], systems[1], resamples, seed, tokenizer)
    lines = [f"A = {names[0]}, B = {names[1]}: {len(systems[0])} images, {resamples} paired resamples", "",
             "| metric | A | B | A - B | 95% interval | p (bootstrap) | p (randomization) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.metric} | {r.first:.4f} | {r.second:.4f} | {r.difference:+.4f} | [{r.low:+.4f}, {r.high:+.4f}] "
              f"| {r.p_bootstrap:.3g} | {r.p_randomization:.3g} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m captioner.significance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="one or two run directories or results files")
    parser.add_argument("--results", default=None, help="the TAG of results_<TAG>.json in a run directory "
                                                        "(test_beam, test_greedy, ...)")
    parser.add_argument("--annotations", type=Path, default=None, help="a COCO captions file of the references")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default="auto", choices=("auto", "java", "python"))
    args = parser.parse_args(argv)
    if len(args.runs) > 2:
        parser.error("give one run (its intervals) or two (the paired test)")
    if args.resamples < 1:
        parser.error("--resamples must be at least 1")
    from captioner.cli import known_errors

    with known_errors():
        files = [results_file(path, args.results) for path in args.runs]
        text = table(files, references_for(files, args.annotations), args.resamples, args.seed, args.tokenizer)
    print(text, end="")


if __name__ == "__main__":
    main(sys.argv[1:])
