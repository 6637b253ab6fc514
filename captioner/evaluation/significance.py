"""Is one set of captions better than another on the same images, or only luckier? Paired tests
over images, with every corpus score recomputed by the coco-caption toolkit's arithmetic.

- The paired bootstrap (Koehn 2004; Berg-Kirkpatrick et al. 2012) draws the images with
  replacement; each drawn copy of an image is a document of its own, as in a results file holding
  the copies, so CIDEr-D's document frequencies are those of the resample. The interval is the
  2.5th-97.5th percentile of the resampled differences; the two-sided p-value counts resamples
  whose difference strays from the observed one by at least the observed one.
- Approximate randomization (Noreen 1989; Riezler and Maxwell 2005) swaps the two captions of each
  image with probability 1/2; p counts the swaps whose difference is at least the observed one.

Both add one to the counts (p >= 1/(resamples + 1)). Nothing is tokenized or counted per resample:
BLEU pools per-image n-gram counts, ROUGE-L is a mean of per-image scores, and CIDEr-D's clipped
tf-idf cosine is a sum over n-grams of ``w_g**2`` times fixed counts, where the weight
``w_g = log N - log max(1, df_g)`` is the only thing a resample changes. N-grams in the references of
one image only have ``df_g`` = that image's number of copies, so they collapse into per-image sums;
the rest take a few sparse products per batch of resamples. METEOR is left out: its corpus score
is computed inside the toolkit's Java jar, from statistics this module cannot recombine.
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import precook
from pycocoevalcap.rouge.rouge import Rouge

from captioner.evaluation.metrics import ImageId, tokenized, tokenized_captions

METRICS = ("Bleu_4", "ROUGE_L", "CIDEr")
SIGMA = 6.0  # CIDEr-D's length penalty, as the toolkit's
ORDERS = 4
BATCH = 16  # resamples per sparse product (its dense side stays in cache)


@dataclass
class _Sparse:
    """A CSR matrix [rows, columns] of fixed counts, one column per set of images whose references
    hold an n-gram (n-grams of one set share every resample's weight), and the per-row sums of the
    counts of the n-grams collapsed into the row's own image."""

    matrix: torch.Tensor
    own: torch.Tensor

    def times(self, weights: torch.Tensor, own_weight: torch.Tensor) -> torch.Tensor:
        """[rows, resamples]: the columns' products plus the collapsed sums times their image's
        weight (``own_weight``: [rows, resamples])."""
        return torch.addcmul(self.matrix @ weights, self.own[:, None], own_weight)


def _csr(rows: list[int], cols: list[int], values: list[float], shape: tuple[int, int]) -> torch.Tensor:
    indices = torch.tensor([rows, cols], dtype=torch.int64).reshape(2, -1)
    with warnings.catch_warnings():  # (sparse CSR is "beta"; the products used here are plain)
        warnings.simplefilter("ignore")
        return torch.sparse_coo_tensor(indices, torch.tensor(values, dtype=torch.float64),
                                       shape).coalesce().to_sparse_csr()


def _bigrams(counts: dict[tuple, int]) -> int:
    """CIDEr-D's caption "length": its number of bigrams (the toolkit counts order 2)."""
    return sum(v for g, v in counts.items() if len(g) == 2)


class CiderReferences:
    """The references' side of CIDEr-D for a fixed list of images: each resample's document
    frequencies and each reference's squared tf-idf norms."""

    def __init__(self, references: Sequence[Sequence[str]]):
        self.num_images = len(references)
        self.counts = [[precook(r) for r in refs] for refs in references]
        images_of: dict[tuple, set] = defaultdict(set)
        for i, refs in enumerate(self.counts):
            for ref in refs:
                for g in ref:
                    images_of[g].add(i)
        self.images_of = {g: frozenset(images) for g, images in images_of.items()}
        # an n-gram in one image's references has that image's copies as its document frequency
        self.only_in = {g: next(iter(images)) for g, images in images_of.items() if len(images) == 1}
        self.sets: dict[frozenset, int] = {}
        self.column: dict[tuple, int] = {}
        for g, images in self.images_of.items():
            if len(images) > 1:
                self.column[g] = self.sets.setdefault(images, len(self.sets))
        self.ref_rows = [(i, r) for i, refs in enumerate(self.counts) for r in range(len(refs))]
        self.image_of_row = torch.tensor([i for i, _ in self.ref_rows])
        self.lengths = torch.tensor([_bigrams(self.counts[i][r]) for i, r in self.ref_rows], dtype=torch.float64)
        self.num_refs = torch.tensor([len(refs) for refs in self.counts], dtype=torch.float64)

    def extend(self, ngrams: Sequence[tuple]) -> None:
        """Give a column to candidate n-grams that are in another image's references only (their
        weight follows that image's copies, not those of the candidate's image)."""
        for g in ngrams:
            if g not in self.column:
                self.column[g] = self.sets.setdefault(self.images_of[g], len(self.sets))

    def finish(self) -> None:
        """The document-frequency matrix [columns, images] and the references' norms, once every
        candidate n-gram has its column."""
        rows = [c for images, c in self.sets.items() for _ in images]
        cols = [i for images in self.sets for i in images]
        self.documents = _csr(rows, cols, [1.0] * len(rows), (len(self.sets), self.num_images))
        self.norms = self._sparse([(row, ref, ref) for row, ref in enumerate(self.counts[i][r] for i, r in self.ref_rows)],
                                  lambda tf, _: tf * tf)

    def _sparse(self, items, value) -> _Sparse:
        """Rows ``row * ORDERS + order`` of ``value(tf, ref_tf)`` over the n-grams of each (row,
        counts, reference counts) in ``items``, the image's own n-grams collapsed."""
        rows, cols, values, own = [], [], [], [0.0] * (len(self.ref_rows) * ORDERS)
        for row, counts, ref in items:
            for g, tf in counts.items():
                if g not in ref:
                    continue
                at = row * ORDERS + len(g) - 1
                if g in self.only_in:
                    own[at] += value(tf, ref[g])
                else:
                    rows.append(at)
                    cols.append(self.column[g])
                    values.append(value(tf, ref[g]))
        return _Sparse(_csr(rows, cols, values, (len(own), len(self.sets))), torch.tensor(own, dtype=torch.float64))

    def weights(self, copies: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared weights [columns, resamples], squared weight of each image's own n-grams
        [images, resamples]) for ``copies`` [resamples, images]."""
        log_n = math.log(float(self.num_images))
        drawn = torch.from_numpy(np.ascontiguousarray(copies.T, dtype=np.float64))
        general = (log_n - torch.log((self.documents @ drawn).clamp_(min=1.0))) ** 2
        own = (log_n - torch.log(drawn.clamp(min=1.0))) ** 2
        return general, own


class CiderCandidates:
    """One system's captions against ``CiderReferences``: the clipped products and the candidate
    norms, so that each resample's per-image CIDEr-D is a few sparse products."""

    def __init__(self, refs: CiderReferences, captions: Sequence[str]):
        self.refs = refs
        self.counts = [precook(c) for c in captions]
        refs.extend([g for i, c in enumerate(self.counts) for g in c if g in refs.only_in and refs.only_in[g] != i])

    def finish(self) -> None:
        refs, n_images = self.refs, self.refs.num_images
        rows, cols, values = [], [], []
        own, absent = [0.0] * (n_images * ORDERS), [0.0] * (n_images * ORDERS)
        for i, cand in enumerate(self.counts):
            for g, tf in cand.items():
                at = i * ORDERS + len(g) - 1
                if g in refs.column:
                    rows.append(at)
                    cols.append(refs.column[g])
                    values.append(tf * tf)
                elif g in refs.only_in:  # (then in image i's own references)
                    own[at] += tf * tf
                else:  # in no reference: document frequency 0, weight log N
                    absent[at] += tf * tf
        self.norms = _Sparse(_csr(rows, cols, values, (len(own), len(refs.sets))), torch.tensor(own, dtype=torch.float64))
        self.absent = torch.tensor(absent, dtype=torch.float64) * math.log(float(n_images)) ** 2
        self.clipped = refs._sparse([(row, self.counts[i], refs.counts[i][r]) for row, (i, r) in enumerate(refs.ref_rows)],
                                    lambda tf, ref_tf: min(tf, ref_tf) * ref_tf)
        lengths = torch.tensor([_bigrams(c) for c in self.counts], dtype=torch.float64)
        delta = lengths[refs.image_of_row] - refs.lengths
        self.penalty = math.e ** (-(delta ** 2) / (2 * SIGMA ** 2))  # [reference rows], the toolkit's e**x

    def image_scores(self, general: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """Per-image CIDEr-D [images, resamples] under the weights of ``CiderReferences.weights``."""
        refs, n_images, resamples = self.refs, self.refs.num_images, general.shape[1]
        own_cand = own.repeat_interleave(ORDERS, dim=0)
        own_ref = own[refs.image_of_row].repeat_interleave(ORDERS, dim=0)
        cand_norm = (self.norms.times(general, own_cand) + self.absent[:, None]).sqrt_().view(n_images, ORDERS, resamples)
        norms = refs.norms.times(general, own_ref).sqrt_().view(-1, ORDERS, resamples).mul_(cand_norm[refs.image_of_row])
        clipped = self.clipped.times(general, own_ref).view(-1, ORDERS, resamples)
        # a norm of 0 has a clipped product of 0 (every weight of its n-grams is 0): value 0, as the toolkit's
        per_ref = clipped.div_(norms.clamp_(min=1e-300)).mul_(self.penalty[:, None, None]).sum(dim=1)
        per_image = torch.zeros(n_images, resamples, dtype=torch.float64).index_add_(0, refs.image_of_row, per_ref)
        return per_image / ORDERS / refs.num_refs[:, None] * 10.0


class CorpusStatistics:
    """Everything a resample needs of one or two systems' captions of the same images, and each
    system's toolkit scores on all of them (``observed``)."""

    def __init__(self, references: Mapping[ImageId, Sequence[str]], systems: Sequence[Mapping[ImageId, str]],
                 tokenizer: str = "auto"):
        for other in systems[1:]:
            if set(other) != set(systems[0]):
                image = sorted(set(systems[0]) ^ set(other), key=str)[0]
                raise ValueError(f"the caption sets are not of the same images (image {image!r} is in one only): "
                                 "a paired test compares captions of the same images")
        gts, first = tokenized(references, systems[0], tokenizer)
        ids = list(gts)
        candidates = [first] + [tokenized_captions({i: [s[i]] for i in ids}, tokenizer) for s in systems[1:]]
        refs = [gts[i] for i in ids]
        self.image_ids, self.num_images = ids, len(ids)
        self.observed, self.rouge, self.fixed_cider, self.bleu = [], [], [], []
        self.cider_refs = CiderReferences(refs)
        self.cider = []
        for res in candidates:
            bleu = BleuScorer(n=ORDERS)
            for i in ids:
                bleu += (res[i][0], gts[i])
            bleus, _ = bleu.compute_score(option="closest", verbose=0)
            rouge, rouge_per_image = Rouge().compute_score(gts, res)
            cider, cider_per_image = Cider().compute_score(gts, res)
            self.observed.append({"Bleu_4": float(bleus[3]), "ROUGE_L": float(rouge), "CIDEr": float(cider)})
            self.rouge.append(np.asarray(rouge_per_image, dtype=np.float64))
            self.fixed_cider.append(np.asarray(cider_per_image, dtype=np.float64))
            self.bleu.append(np.array([[c["testlen"], bleu._single_reflen(c["reflen"], "closest", c["testlen"]),
                                        *c["guess"], *c["correct"]] for c in bleu.ctest], dtype=np.int64))
            self.cider.append(CiderCandidates(self.cider_refs, [res[i][0] for i in ids]))
        self.cider_refs.finish()
        for system in self.cider:
            system.finish()

    def corpus(self, copies: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Per system, each metric's corpus score on each resample ``copies`` [resamples, images]
        (how many times each image was drawn), as the toolkit scores a file holding the copies."""
        out = [{name: np.empty(len(copies)) for name in METRICS} for _ in self.bleu]
        for start in range(0, len(copies), BATCH):
            chunk = copies[start : start + BATCH]
            general, own = self.cider_refs.weights(chunk)
            drawn = torch.from_numpy(np.ascontiguousarray(chunk.T, dtype=np.float64))
            for s, scores in enumerate(out):
                scores["Bleu_4"][start : start + BATCH] = _bleu4(chunk @ self.bleu[s])
                scores["ROUGE_L"][start : start + BATCH] = chunk @ self.rouge[s] / self.num_images
                per_image = self.cider[s].image_scores(general, own)
                scores["CIDEr"][start : start + BATCH] = ((drawn * per_image).sum(dim=0) / self.num_images).numpy()
        return out

    def swapped(self, swaps: np.ndarray) -> dict[str, np.ndarray]:
        """Each metric's difference (first system minus second) when the images where ``swaps``
        [trials, images] is true exchange their two captions. Swapping leaves the references, so
        CIDEr-D's document frequencies and each image's CIDEr-D, as they are."""
        first, second = (~swaps).astype(np.int64), swaps.astype(np.int64)
        sign = np.where(swaps, -1.0, 1.0)
        return {
            "Bleu_4": _bleu4(first @ self.bleu[0] + second @ self.bleu[1])
            - _bleu4(first @ self.bleu[1] + second @ self.bleu[0]),
            "ROUGE_L": sign @ (self.rouge[0] - self.rouge[1]) / self.num_images,
            "CIDEr": sign @ (self.fixed_cider[0] - self.fixed_cider[1]) / self.num_images,
        }


def _bleu4(pooled: np.ndarray) -> np.ndarray:
    """Corpus BLEU-4 of each row of pooled counts [testlen, reflen, guess 1-4, correct 1-4]: the
    toolkit's float arithmetic, operation for operation (Python floats, so bit for bit)."""
    small, tiny = 1e-9, 1e-15
    out = []
    for testlen, reflen, *counts in pooled.tolist():
        bleu = 1.0
        for k in range(ORDERS):
            bleu *= float(counts[ORDERS + k] + tiny) / (counts[k] + small)
        score = bleu ** (1.0 / ORDERS)
        ratio = (testlen + tiny) / (reflen + small)
        out.append(score * math.exp(1 - 1 / ratio) if ratio < 1 else score)
    return np.array(out)


def draw_copies(num_images: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, images]: how many times each image is drawn in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, num_images, (resamples, num_images))
    copies = np.zeros((resamples, num_images), dtype=np.int64)
    np.add.at(copies, (np.arange(resamples)[:, None], draws), 1)
    return copies


@dataclass
class Comparison:
    metric: str
    first: float
    second: float
    difference: float
    low: float  # the 95% bootstrap interval of the difference
    high: float
    p_bootstrap: float
    p_randomization: float


@dataclass
class Interval:
    metric: str
    score: float
    low: float
    high: float


def paired_test(references: Mapping[ImageId, Sequence[str]], first: Mapping[ImageId, str],
                second: Mapping[ImageId, str], resamples: int = 1000, seed: int = 0,
                tokenizer: str = "auto") -> list[Comparison]:
    """The paired bootstrap and approximate randomization of ``first`` against ``second`` (captions
    of the same images), per metric; the scores and difference are the toolkit's on all images."""
    stats = CorpusStatistics(references, [first, second], tokenizer)
    boot_first, boot_second = stats.corpus(draw_copies(stats.num_images, resamples, seed))
    randomized = stats.swapped(np.random.default_rng(seed + 1).random((resamples, stats.num_images)) < 0.5)
    out = []
    for metric in METRICS:
        a, b = stats.observed[0][metric], stats.observed[1][metric]
        delta, diffs = a - b, boot_first[metric] - boot_second[metric]
        p_boot = (1 + np.count_nonzero(np.abs(diffs - delta) >= abs(delta))) / (resamples + 1)
        p_rand = (1 + np.count_nonzero(np.abs(randomized[metric]) >= abs(delta))) / (resamples + 1)
        low, high = np.percentile(diffs, [2.5, 97.5])
        out.append(Comparison(metric, a, b, delta, float(low), float(high), float(p_boot), float(p_rand)))
    return out


def intervals(references: Mapping[ImageId, Sequence[str]], captions: Mapping[ImageId, str],
              resamples: int = 1000, seed: int = 0, tokenizer: str = "auto") -> list[Interval]:
    """Each metric's toolkit score and its 95% bootstrap interval over images."""
    stats = CorpusStatistics(references, [captions], tokenizer)
    (boot,) = stats.corpus(draw_copies(stats.num_images, resamples, seed))
    return [Interval(m, stats.observed[0][m], *map(float, np.percentile(boot[m], [2.5, 97.5]))) for m in METRICS]
