"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE), as the coco-caption toolkit
computes them.

The scores come from the toolkit's own scorers (the ``pycocoevalcap`` package), fed exactly what
its ``COCOEvalCap`` feeds them: both sides tokenized by the PTB tokenizer, BLEU with the
"closest" reference length, CIDEr-D document frequencies from the references of the images being
scored. All values are on the toolkit's 0-1 scale (papers usually print them x100).

The tokenizer is the toolkit's Java one (``tokenizer="java"``) or its pure-Python port in
``captioner.data.tokenizer`` (``"python"``), which gives the same token lists without starting Java.
METEOR (and SPICE) run in Java; without Java their value is None, "unavailable", never 0.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import warnings
from typing import Iterable, Mapping, Sequence, Union

from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import spice as _spice_module
from pycocoevalcap.tokenizer import ptbtokenizer

from captioner.data.tokenizer import PUNCTUATIONS, as_line, tokenize_lines

__all__ = ["METRICS", "score_captions", "image_scores", "tokenized", "tokenized_captions", "score_results_file",
           "read_results", "read_references", "format_scores", "java_available"]

# Metric name -> the score keys it produces, in the toolkit's order.
METRICS: dict[str, tuple[str, ...]] = {
    "bleu": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"),
    "meteor": ("METEOR",),
    "rouge": ("ROUGE_L",),
    "cider": ("CIDEr",),
    "spice": ("SPICE",),
}
DEFAULT_METRICS = ("bleu", "meteor", "rouge", "cider")
TOKENIZERS = ("auto", "java", "python")

ImageId = Union[int, str]
Scores = dict[str, Union[float, None, dict]]


def java_available() -> bool:
    return shutil.which("java") is not None


def score_captions(references: Mapping[ImageId, Sequence[str]], candidates: Mapping[ImageId, str],
                   metrics: Iterable[str] = DEFAULT_METRICS, tokenizer: str = "auto") -> Scores:
    """Score one candidate caption per image against that image's reference captions.

    Only the images in ``candidates`` are scored (their ids must all be in ``references``), in
    the order of ``candidates``. Returns the scores of the requested metrics on the 0-1 scale
    (keys from ``METRICS``; None where a metric cannot run here) and, with "bleu", the corpus
    BLEU counts under "bleu_counts" (reflen, testlen and the per-order guess/correct n-grams).

    ``tokenizer``: "java" (the toolkit's PTBTokenizer; needs Java), "python" (the pure-Python
    port: same tokens, no Java start-up) or "auto" (Java when there is one).
    """
    metrics = _check_metrics(metrics)
    gts, res = tokenized(references, candidates, tokenizer)

    scores: Scores = {}
    for metric in metrics:
        scores.update(_SCORERS[metric](gts, res))
    return scores


def image_scores(references: Mapping[ImageId, Sequence[str]], candidates: Mapping[ImageId, str],
                 tokenizer: str = "auto") -> dict[ImageId, dict[str, float]]:
    """Each candidate image's own CIDEr-D and BLEU-4, from the toolkit's scorers on the tokens
    ``score_captions`` scores: CIDEr-D's per-image values, whose mean is the corpus CIDEr-D
    (document frequencies from the references of all the images), and BLEU-4 of the image's
    sentence ("closest" reference length), the toolkit's per-sentence BLEU (the corpus BLEU pools
    the n-gram counts instead, so it is not their mean)."""
    gts, res = tokenized(references, candidates, tokenizer)
    _, cider = Cider().compute_score(gts, res)  # (in the order of gts' keys)
    scorer = BleuScorer(n=4)
    for image_id in gts:
        scorer += (res[image_id][0], gts[image_id])
    _, per_sentence = scorer.compute_score(option="closest", verbose=0)
    return {image_id: {"CIDEr": float(c), "Bleu_4": float(b)} for image_id, c, b in zip(gts, cider, per_sentence[3])}


def tokenized(references: Mapping[ImageId, Sequence[str]], candidates: Mapping[ImageId, str],
              tokenizer: str = "auto") -> tuple[dict, dict]:
    """({image: [tokenized reference, ...]}, {image: [tokenized candidate]}) of the candidates'
    images, in the candidates' order: what the toolkit's scorers read."""
    gts_raw, res_raw = _select(references, candidates)
    return _tokenize(gts_raw, res_raw, _resolve_tokenizer(tokenizer))


def score_results_file(results_json: Union[str, os.PathLike], annotations_json: Union[str, os.PathLike],
                       metrics: Iterable[str] = DEFAULT_METRICS, tokenizer: str = "auto") -> Scores:
    """Score a COCO results file against a COCO captions annotation file, like ``COCOEvalCap``.

    Results are ``[{"image_id": ..., "caption": ...}, ...]`` with one caption per image; only
    the images in the results are scored, in the annotation file's image order (as the toolkit).
    """
    references = read_references(annotations_json)
    by_image = read_results(results_json)
    _check_subset(by_image, references, f"{results_json}: images missing from {annotations_json}")
    candidates = {image_id: by_image[image_id] for image_id in references if image_id in by_image}
    return score_captions(references, candidates, metrics=metrics, tokenizer=tokenizer)


def read_results(results_json: Union[str, os.PathLike]) -> dict[ImageId, str]:
    """{image_id: caption} of a COCO results file, each entry checked (one caption per image)."""
    from captioner.io import read_json

    results = read_json(results_json, "results file")
    if not isinstance(results, list) or not all(isinstance(r, dict) and {"image_id", "caption"} <= set(r)
                                                for r in results):
        raise ValueError(f"results file {results_json} is not in the COCO results format "
                         '([{"image_id": ..., "caption": ...}, ...])')
    _check_entries(results, results_json)
    by_image: dict[ImageId, str] = {}
    for item in results:
        image_id = item["image_id"]
        if image_id in by_image:
            raise ValueError(f"{results_json}: image {image_id!r} has more than one caption; "
                             "the toolkit scores exactly one caption per image")
        by_image[image_id] = item["caption"]
    return by_image


def read_references(annotations_json: Union[str, os.PathLike]) -> dict[ImageId, list[str]]:
    """{image_id: [caption, ...]} of a COCO captions file, in its image order, each entry checked."""
    from captioner.io import read_json

    annotations = read_json(annotations_json, "annotations file")
    if not isinstance(annotations, dict) or not isinstance(annotations.get("annotations"), list) or not all(
            isinstance(a, dict) and {"image_id", "caption"} <= set(a) for a in annotations["annotations"]):
        raise ValueError(f"annotations file {annotations_json} is not a COCO captions file "
                         '({"images": [...], "annotations": [{"image_id": ..., "caption": ...}, ...]})')
    _check_entries(annotations["annotations"], annotations_json)
    references: dict[ImageId, list[str]] = {}
    for image in annotations.get("images", []):
        if isinstance(image, dict) and "id" in image:
            references[image["id"]] = []
    for ann in annotations["annotations"]:
        references.setdefault(ann["image_id"], []).append(ann["caption"])
    return references


# Longer is not a caption; ROUGE-L's and METEOR's alignments take memory quadratic in its length.
MAX_CAPTION_CHARS = 10_000


def _check_entries(entries: list, path) -> None:
    """Every entry's image_id a number or a string and its caption a string of at most
    ``MAX_CAPTION_CHARS``: the first that is not is one error naming the file and the entry."""
    for i, entry in enumerate(entries):
        image_id, caption = entry["image_id"], entry["caption"]
        if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
            raise ValueError(f"{path}: entry {i} has image_id {_short(image_id)}, not a number or a string")
        if not isinstance(caption, str):
            raise ValueError(f"{path}: entry {i} (image {image_id!r}) has caption {_short(caption)}, not a string")
        if len(caption) > MAX_CAPTION_CHARS:
            raise ValueError(f"{path}: entry {i} (image {image_id!r}) has a caption of {len(caption):,} characters, "
                             f"not a caption (at most {MAX_CAPTION_CHARS:,} are scored)")
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{path}: entry {i} (image {image_id!r}) has a caption with a lone surrogate "
                             f"({caption.encode('utf-8', 'backslashreplace').decode()!r}): not text") from None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def format_scores(scores: Mapping[str, object], digits: int = 3) -> str:
    """One line such as "scores on the 0-1 scale: Bleu_1 0.579 | ... | METEOR n/a"."""
    parts = []
    for keys in METRICS.values():
        for key in keys:
            if key in scores:
                value = scores[key]
                parts.append(f"{key} n/a" if value is None else f"{key} {float(value):.{digits}f}")
    return "scores on the 0-1 scale: " + " | ".join(parts)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def _check_metrics(metrics: Iterable[str]) -> list[str]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = [m.lower() for m in metrics]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {list(METRICS)}")
    return metrics


def _check_subset(candidates: Mapping, references: Mapping, message: str) -> None:
    missing = [image_id for image_id in candidates if image_id not in references]
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise ValueError(f"{message}: {len(missing)} candidate image id(s) have no references ({shown})")


def _select(references: Mapping[ImageId, Sequence[str]], candidates: Mapping[ImageId, str]):
    """The reference lists and candidate captions of the scored images, as plain dicts."""
    if not candidates:
        raise ValueError("no candidate captions to score")
    _check_subset(candidates, references, "candidate ids must be a subset of the reference ids")
    gts, res = {}, {}
    for image_id, caption in candidates.items():
        if not isinstance(caption, str):
            raise TypeError(f"image {image_id!r}: the candidate must be one caption (a str), "
                            f"not {type(caption).__name__}")
        refs = references[image_id]
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"image {image_id!r}: references must be a non-empty list of captions")
        gts[image_id] = list(refs)
        res[image_id] = [caption]
    return gts, res


# ---------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------
def _resolve_tokenizer(tokenizer: str) -> str:
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    if tokenizer == "auto":
        return "java" if java_available() else "python"
    if tokenizer == "java" and not java_available():
        raise RuntimeError("tokenizer='java' needs a java executable on PATH; "
                           "tokenizer='python' gives the same tokens without it")
    return tokenizer


def _tokenize(gts: dict, res: dict, tokenizer: str) -> tuple[dict, dict]:
    # As COCOEvalCap: references and candidates are tokenized separately, each as one file.
    tokenize_file = _java_tokenize_lines if tokenizer == "java" else tokenize_lines
    return _tokenize_captions(gts, tokenize_file), _tokenize_captions(res, tokenize_file)


def tokenized_captions(captions_for_image: Mapping[ImageId, Sequence[str]], tokenizer: str = "auto") -> dict:
    """{image: [caption, ...]} tokenized as one file, as ``tokenized`` tokenizes each side."""
    resolved = _resolve_tokenizer(tokenizer)
    return _tokenize_captions(dict(captions_for_image), _java_tokenize_lines if resolved == "java" else tokenize_lines)


def _tokenize_captions(captions_for_image: dict, tokenize_file) -> dict:
    """{image: [caption, ...]} -> {image: [tokenized caption, ...]}, one tokenizer run in all."""
    flat = [c for caps in captions_for_image.values() for c in caps]
    lines = iter(tokenize_file(flat))
    return {image_id: [" ".join(next(lines)) for _ in caps]
            for image_id, caps in captions_for_image.items()}


def _java_tokenize_lines(captions: Sequence[str]) -> list[list[str]]:
    """The toolkit's PTBTokenizer: the same command on the same file, minus its console noise."""
    jar = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)),
                       ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    # The toolkit only replaces "\n"; any other line break splits a caption over two output lines
    # and shifts all the following ones onto the wrong images, so all of them become spaces.
    text = "\n".join(as_line(c) for c in captions)
    with tempfile.TemporaryDirectory(prefix="ptb-") as tmp:
        path = os.path.join(tmp, "captions.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        proc = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
                               "-preserveLines", "-lowerCase", path],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"Java PTBTokenizer failed (exit {proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace')[-2000:]}")
    lines = proc.stdout.decode("utf-8").split("\n")
    if len(lines) != len(captions):
        raise RuntimeError(f"Java PTBTokenizer returned {len(lines)} lines for {len(captions)} captions")
    return [[w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS and w] for line in lines]


# ---------------------------------------------------------------------------------------------
# Scorers: the toolkit's, called as COCOEvalCap calls them.
# ---------------------------------------------------------------------------------------------
def _bleu(gts: dict, res: dict) -> Scores:
    # Bleu(4).compute_score, without its print of the counts, keeping the counts instead.
    scorer = BleuScorer(n=4)
    for image_id in gts:
        scorer += (res[image_id][0], gts[image_id])
    bleus, _ = scorer.compute_score(option="closest", verbose=0)
    counts = {
        "reflen": scorer.reflen(option="closest"),
        "testlen": scorer.testlen(option="closest"),
        "guess": [sum(c["guess"][k] for c in scorer.ctest) for k in range(4)],
        "correct": [sum(c["correct"][k] for c in scorer.ctest) for k in range(4)],
    }
    scores: Scores = {key: float(b) for key, b in zip(METRICS["bleu"], bleus)}
    scores["bleu_counts"] = counts
    return scores


def _rouge(gts: dict, res: dict) -> Scores:
    score, _ = Rouge().compute_score(gts, res)
    return {"ROUGE_L": float(score)}


def _cider(gts: dict, res: dict) -> Scores:
    score, _ = Cider().compute_score(gts, res)
    return {"CIDEr": float(score)}


def _meteor(gts: dict, res: dict) -> Scores:
    if not java_available():
        warnings.warn("METEOR unavailable: it runs in Java and there is no java on PATH",
                      RuntimeWarning, stacklevel=3)
        return {"METEOR": None}
    try:
        meteor = Meteor()
    except OSError as e:
        warnings.warn(f"METEOR unavailable: could not start Java ({e})", RuntimeWarning, stacklevel=3)
        return {"METEOR": None}
    try:
        score, _ = meteor.compute_score(gts, res)
        return {"METEOR": float(score)}
    except (ValueError, OSError) as e:  # the Java process died: it answers with an empty line
        warnings.warn(f"METEOR unavailable: the METEOR Java process failed ({e}); "
                      f"stderr: {_stderr_tail(meteor.meteor_p)}", RuntimeWarning, stacklevel=3)
        return {"METEOR": None}
    finally:
        _close_meteor(meteor)


def _close_meteor(meteor) -> None:
    """Stop the scorer's Java process now (pycocoevalcap only does it in __del__)."""
    proc = meteor.meteor_p
    proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        try:
            stream.close()
        except OSError:
            pass
    # compute_score leaves its lock held when it fails, and __del__ takes the lock.
    if meteor.lock.locked():
        meteor.lock.release()


def _stderr_tail(proc: subprocess.Popen) -> str:
    try:
        proc.kill()  # so that reading stderr to its end returns
        return proc.stderr.read()[-2000:].decode(errors="replace")
    except (OSError, ValueError):
        return "(not readable)"


def _spice_models_present() -> bool:
    lib = os.path.join(os.path.dirname(os.path.abspath(_spice_module.__file__)), "lib")
    return all(os.path.exists(os.path.join(lib, name))
               for name in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"))


def _spice(gts: dict, res: dict) -> Scores:
    # SPICE downloads Stanford CoreNLP models on first use; never trigger that from here.
    if not java_available() or not _spice_models_present():
        warnings.warn("SPICE unavailable: it needs Java and the Stanford CoreNLP 3.6.0 models in "
                      "pycocoevalcap/spice/lib (get_stanford_models.py downloads them)",
                      RuntimeWarning, stacklevel=3)
        return {"SPICE": None}
    try:
        score, _ = _spice_module.Spice().compute_score(gts, res)
    except (subprocess.CalledProcessError, OSError, ValueError) as e:
        warnings.warn(f"SPICE unavailable: {e}", RuntimeWarning, stacklevel=3)
        return {"SPICE": None}
    return {"SPICE": float(score)}


_SCORERS = {"bleu": _bleu, "meteor": _meteor, "rouge": _rouge, "cider": _cider, "spice": _spice}
