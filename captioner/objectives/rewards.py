"""Per-caption CIDEr-D rewards for self-critical training, vectorized and exact to the toolkit.

``CiderD(corpus).score(image_ids, candidates)`` gives every candidate caption the CIDEr-D that
pycocoevalcap's ``CiderScorer`` (the scorer behind ``captioner.evaluation.metrics``' CIDEr) would give it,
to floating-point rounding: 1- to 4-grams, tf-idf vectors with raw n-gram counts as term
frequencies and ``log(N) - log(max(1, df))`` as idf, the clipped similarity
``min(v_hyp, v_ref) * v_ref`` over the norms, the Gaussian length penalty with sigma 6, the mean
over n and over the references, times 10. Two of the toolkit's details are kept on purpose: the
"length" in the penalty is the caption's bigram count (max(0, words - 1)), and an n-gram no
reference contains gets df 1 (idf log N).

The document frequencies and N come from the corpus given to the constructor, computed once;
``score`` then does array arithmetic over the whole batch. The scored images' references are the
corpus's own by default (SCST on the training split); ``score(..., references=...)`` scores against
other references with the corpus's document frequencies (validation captions, training df).
With ``CiderD(refs_of_the_scored_images)`` the scores are those of ``captioner.evaluate``.

Captions are token lists: words (str) or vocabulary ids (int), anything hashable. The toolkit
compares space-separated words, so the two agree for tokens without whitespace; ``3`` and ``"3"``
are different tokens here.

How it is fast: tokens become integer ids; a k-gram's id is found from its (k-1)-gram prefix id
and its last token packed into one int64 (``prefix * 2**32 + token``), looked up in the sorted
table of the corpus's k-grams (``np.searchsorted``); n-grams the corpus lacks get fresh ids per
call. The references' tf-idf weights are computed once and grouped by (image, n-gram), so the
candidates' (image, n-gram) entries find all the reference entries they match with one
``searchsorted``, and ``np.bincount`` sums the clipped products per (candidate, reference, order).
Per call this is a few sorts and searches over arrays of the batch's n-grams, no Python loop
beyond mapping the tokens to ids.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from itertools import chain

import numpy as np

__all__ = ["CiderD", "bleu4"]

ORDERS = 4  # 1- to 4-grams, as the toolkit's Cider()
SIGMA = 6.0  # the toolkit's length-penalty width
_SHIFT = np.int64(2**32)  # key of a k-gram = (k-1)-gram id * 2**32 + last token id
_MAX_KEY = 2**62  # (group, n-gram, caption) keys up to this size are packed into one int64

ImageId = Hashable
Caption = Sequence[Hashable]


class _Captions:
    """Captions as one flat array of token ids."""

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray):
        self.tokens = tokens  # (T,) int64
        self.lengths = lengths  # (C,) int64, words per caption
        self.owner = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)  # caption of each token
        ends = np.cumsum(lengths)
        self._left = ends[self.owner] - np.arange(len(tokens), dtype=np.int64)  # tokens from here on

    def __len__(self) -> int:
        return len(self.lengths)

    def starts(self, k: int) -> np.ndarray:
        """Flat positions where a k-gram starts."""
        return np.flatnonzero(self._left >= k)


class _References:
    """The tf-idf entries of reference captions, grouped by (image, n-gram) for the join.

    Images are numbered 0..I-1; image i owns references ``ref_start[i]:ref_start[i+1]`` and the
    groups ``image_groups[i]:image_groups[i+1]``, sorted by n-gram code; group g is one n-gram of
    that image, held by the references ``ref[group_start[g]:group_start[g+1]]`` with tf-idf
    weights ``value[...]``.
    """

    def __init__(self, ref_start, image_groups, group_gram, group_start, ref, value, norm, length):
        self.ref_start = ref_start  # (I+1,)
        self.image_groups = image_groups  # (I+1,)
        self.group_gram = group_gram  # (G,) n-gram code: id * ORDERS + (k - 1)
        self.group_start = group_start  # (G+1,)
        self.ref = ref  # (E,) reference index
        self.value = value  # (E,) tf-idf weight
        self.norm = norm  # (R, ORDERS) norm of each order's tf-idf vector
        self.length = length  # (R,) bigram count, the toolkit's "length"


class CiderD:
    """CIDEr-D of each candidate caption, with document frequencies from a fixed corpus.

    ``references`` maps each image id of the corpus to its reference captions (token lists);
    N = len(references). ``include_eos=True`` appends ``eos`` to every reference and candidate
    before counting (as self-critical.pytorch does, so that a caption cut short scores lower);
    the captions themselves should then not contain it. The default is the toolkit's form.
    """

    def __init__(self, references: Mapping[ImageId, Sequence[Caption]], include_eos: bool = False,
                 eos: Hashable | None = None):
        if include_eos and eos is None:
            raise ValueError("include_eos=True needs the eos token (eos=...)")
        if not references:
            raise ValueError("CiderD needs a non-empty reference corpus")
        self.include_eos = bool(include_eos)
        self.eos = eos
        self._image_index = {image_id: i for i, image_id in enumerate(references)}
        self.num_images = len(self._image_index)
        self.ref_len = float(np.log(float(self.num_images)))  # the toolkit's self.ref_len
        self._vocab: dict = {eos: 0} if include_eos else {}

        counts, captions = self._reference_lists(references, list(references))
        corpus = self._encode(captions, grow=True)
        # The corpus's k-gram tables: _tables[k-1] holds the sorted keys of its k-grams (k >= 2)
        # and a k-gram's id is its index there; a 1-gram's id is its token id.
        self._tables: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
        self._sizes = [len(self._vocab)]
        gram, caption = self._ngrams(corpus, build=True)
        self._code_space = ORDERS * max(1, *self._sizes)  # every corpus n-gram code is below it

        # Document frequency: in how many images' references the n-gram occurs.
        image_of_ref = np.repeat(np.arange(self.num_images, dtype=np.int64), counts)
        image_gram = np.unique(image_of_ref[caption] * self._code_space + gram)
        df = np.bincount(image_gram % self._code_space, minlength=self._code_space).astype(np.float64)
        # idf as the toolkit: ref_len - np.log(max(1.0, df)); n-grams the corpus lacks get ref_len.
        self._idf = self.ref_len - np.log(np.maximum(1.0, df))
        self._refs = self._build_references(counts, corpus.lengths, caption, gram)

    # -----------------------------------------------------------------------------------------
    def score(self, image_ids: Sequence[ImageId], candidates: Sequence[Caption],
              references: Mapping[ImageId, Sequence[Caption]] | None = None) -> np.ndarray:
        """CIDEr-D of ``candidates[i]`` against the references of ``image_ids[i]``, float64 (B,).

        An image may appear any number of times (e.g. 5 samples and 1 greedy caption per image).
        ``references`` (optional) maps the scored image ids to their reference captions; the
        default is the constructor's corpus. The document frequencies are always the corpus's.
        """
        image_ids = image_ids.tolist() if hasattr(image_ids, "tolist") else list(image_ids)
        candidates = list(candidates)
        num = len(candidates)
        if len(image_ids) != num:
            raise ValueError(f"{len(image_ids)} image ids for {num} candidates")
        if num == 0:
            return np.zeros(0, dtype=np.float64)

        if references is None:
            index = self._image_index
            try:
                image = np.fromiter(map(index.__getitem__, image_ids), dtype=np.int64, count=num)
            except KeyError as err:
                raise KeyError(f"image id {err.args[0]!r} is not in the CiderD corpus; "
                               "pass the references of such images with references=...") from None
            images, image = np.unique(image, return_inverse=True)
            refs = self._refs
            cand = self._encode(candidates, grow=False)
            gram, caption = self._ngrams(cand)
            lengths = cand.lengths
        else:
            local = dict.fromkeys(image_ids)
            missing = [i for i in local if i not in references]
            if missing:
                raise KeyError(f"{len(missing)} image id(s) have no entry in references, e.g. {missing[0]!r}")
            for n, image_id in enumerate(local):
                local[image_id] = n
            image = np.fromiter(map(local.__getitem__, image_ids), dtype=np.int64, count=num)
            images = np.arange(len(local), dtype=np.int64)
            counts, ref_captions = self._reference_lists(references, list(local))
            # Candidates and references in one go, so that an n-gram the corpus lacks gets the
            # same (fresh) code on both sides.
            both = self._encode(list(candidates) + ref_captions, grow=False)
            gram, caption = self._ngrams(both)
            is_ref = caption >= num
            refs = self._build_references(counts, both.lengths[num:], caption[is_ref] - num, gram[is_ref])
            lengths = both.lengths[:num]
            gram, caption = gram[~is_ref], caption[~is_ref]
        return self._cider(image, images, refs, lengths, caption, gram)

    __call__ = score

    # -----------------------------------------------------------------------------------------
    # Captions -> n-gram codes
    # -----------------------------------------------------------------------------------------
    @staticmethod
    def _reference_lists(references: Mapping, image_ids: list) -> tuple[np.ndarray, list]:
        counts = np.zeros(len(image_ids), dtype=np.int64)
        captions: list = []
        for n, image_id in enumerate(image_ids):
            refs = references[image_id]
            if isinstance(refs, (str, bytes)) or len(refs) == 0:
                raise ValueError(f"image {image_id!r}: references must be a non-empty list of captions "
                                 "(each a list of tokens)")
            counts[n] = len(refs)
            captions.extend(refs)
        return counts, captions

    @staticmethod
    def _tokens(caption) -> list:
        if isinstance(caption, (str, bytes)):
            raise TypeError(f"a caption must be a sequence of tokens, not a {type(caption).__name__} "
                            "(split it into words first)")
        if hasattr(caption, "tolist"):  # numpy arrays, torch tensors: their items as Python ints
            return caption.tolist()
        return list(caption)

    def _encode(self, captions: list, grow: bool) -> _Captions:
        """Token lists -> token ids (and eos appended when include_eos). A token the corpus
        lacks gets an id past the corpus vocabulary, the same within this call; ``grow`` adds it
        to the vocabulary instead (the corpus)."""
        captions = [c if type(c) is list else self._tokens(c) for c in captions]
        lengths = np.fromiter(map(len, captions), dtype=np.int64, count=len(captions))
        flat = list(chain.from_iterable(captions))
        vocab = self._vocab
        if grow:
            setdefault = vocab.setdefault
            ids = np.fromiter((setdefault(t, len(vocab)) for t in flat), dtype=np.int64, count=len(flat))
        else:
            try:
                ids = np.fromiter(map(vocab.__getitem__, flat), dtype=np.int64, count=len(flat))
            except KeyError:
                extra: dict = {}
                base, get = len(vocab), vocab.get
                ids = np.fromiter((get(t, -1) for t in flat), dtype=np.int64, count=len(flat))
                unknown = np.flatnonzero(ids < 0)
                ids[unknown] = [base + extra.setdefault(flat[i], len(extra)) for i in unknown.tolist()]
        if self.include_eos:
            ids = np.insert(ids, np.cumsum(lengths), self._vocab[self.eos])
            lengths = lengths + 1
        return _Captions(ids, lengths)

    def _ngrams(self, captions: _Captions, build: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(n-gram code, caption) of every n-gram occurrence. The code of a corpus n-gram is
        ``id * ORDERS + (k - 1)``; an n-gram the corpus lacks gets ``_code_space`` plus a code
        of that form with a fresh id (``build``: make the corpus tables from these captions)."""
        tokens = captions.tokens
        codes, owners = [tokens * ORDERS], [captions.owner]
        if not build and len(tokens) and tokens.max() >= self._sizes[0]:  # tokens the corpus lacks
            codes[0] = np.where(tokens >= self._sizes[0], self._code_space + codes[0], codes[0])
        prefix = tokens  # the (k-1)-gram id at each position
        for k in range(2, ORDERS + 1):
            pos = captions.starts(k)
            keys = prefix[pos] * _SHIFT + tokens[pos + k - 1]
            if build:
                table, ids = np.unique(keys, return_inverse=True)
                self._tables.append(table)
                self._sizes.append(len(table))
                code = ids * ORDERS + (k - 1)
            else:
                # Look each distinct key up once, in sorted order (searchsorted is fastest so).
                unique, inverse = np.unique(keys, return_inverse=True)
                table = self._tables[k - 1]
                at = np.searchsorted(table, unique)
                found = at < len(table)
                found[found] = table[at[found]] == unique[found]
                fresh = ~found
                unique_ids = np.where(found, at, self._sizes[k - 1] + np.cumsum(fresh) - 1)
                unique_codes = unique_ids * ORDERS + (k - 1) + np.where(found, 0, self._code_space)
                ids, code = unique_ids[inverse], unique_codes[inverse]
            prefix = np.full(len(tokens), -1, dtype=np.int64)
            prefix[pos] = ids
            codes.append(code)
            owners.append(captions.owner[pos])
        return np.concatenate(codes), np.concatenate(owners)

    # -----------------------------------------------------------------------------------------
    # n-gram codes -> tf-idf entries -> scores
    # -----------------------------------------------------------------------------------------
    def _weights(self, gram: np.ndarray) -> np.ndarray:
        """idf of each n-gram code: the corpus's; ref_len for n-grams it lacks (df 0 -> 1)."""
        known = gram < self._code_space
        if known.all():
            return self._idf[gram]
        out = np.full(len(gram), self.ref_len)
        out[known] = self._idf[gram[known]]
        return out

    def _entries(self, group, gram, caption, num_groups: int, num_captions: int):
        """Distinct (group, n-gram, caption) occurrences sorted in that order, with the
        caption's tf-idf weight of the n-gram; and the (captions, ORDERS) norms."""
        space = int(gram.max()) + 1 if len(gram) else 1
        if num_groups * space * num_captions < _MAX_KEY:
            keys, tf = np.unique((group * space + gram) * num_captions + caption, return_counts=True)
            caption = keys % num_captions
            group_gram = keys // num_captions
        else:  # too many for one int64 key (a corpus of millions of captions): two steps
            group_of = np.zeros(num_captions, dtype=np.int64)
            group_of[caption] = group
            keys, tf = np.unique(caption * space + gram, return_counts=True)
            caption = keys // space
            group_gram = group_of[caption] * space + keys % space
            order = np.argsort(group_gram, kind="stable")
            group_gram, caption, tf = group_gram[order], caption[order], tf[order]
        gram = group_gram % space
        value = tf * self._weights(gram)  # the toolkit: float(term_freq) * (ref_len - df)
        squares = np.bincount(caption * ORDERS + gram % ORDERS, weights=value * value,
                              minlength=num_captions * ORDERS)
        return group_gram // space, gram, caption, value, np.sqrt(squares).reshape(num_captions, ORDERS)

    def _build_references(self, counts, lengths, caption, gram) -> _References:
        """_References of captions with these word ``lengths``, ``counts[i]`` of them for image i,
        from their n-gram occurrences (caption index, n-gram code)."""
        ref_start = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        image_of_ref = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        image, gram, ref, value, norm = self._entries(image_of_ref[caption], gram, caption,
                                                      len(counts), len(lengths))
        change = np.ones(len(gram), dtype=bool)  # where a new (image, n-gram) group starts
        change[1:] = (image[1:] != image[:-1]) | (gram[1:] != gram[:-1])
        first = np.flatnonzero(change)
        group_start = np.append(first, len(gram)).astype(np.int64)
        image_groups = np.searchsorted(image[first], np.arange(len(counts) + 1, dtype=np.int64))
        return _References(ref_start, image_groups, gram[first], group_start, ref, value, norm,
                           np.maximum(lengths - 1, 0))

    def _cider(self, cand_image, images, refs: _References, lengths, caption, gram) -> np.ndarray:
        """Scores of the candidates: candidate c has ``lengths[c]`` words and the references of
        refs' image ``images[cand_image[c]]``; (caption, gram) are its n-gram occurrences."""
        num = len(cand_image)
        image, gram, cand, value, norm = self._entries(cand_image[caption], gram, caption, len(images), num)

        # The batch's (image, n-gram) groups, keyed by local image: sorted keys.
        lo, hi = refs.image_groups[images], refs.image_groups[images + 1]
        groups = _ranges(lo, hi)
        group_gram = refs.group_gram[groups]
        space = max(int(group_gram.max()) if len(groups) else 0, int(gram.max()) if len(gram) else 0) + 1
        group_keys = np.repeat(np.arange(len(images), dtype=np.int64), hi - lo) * space + group_gram

        # Every (candidate entry, reference entry of its image with the same n-gram) match.
        keys = image * space + gram  # sorted, like group_keys
        at = np.searchsorted(group_keys, keys)
        hit = at < len(group_keys)
        hit[hit] = group_keys[at[hit]] == keys[hit]
        hit = np.flatnonzero(hit)
        group = groups[at[hit]]
        first, last = refs.group_start[group], refs.group_start[group + 1]
        matched = _ranges(first, last)
        which = np.repeat(hit, last - first)
        v_hyp, v_ref = value[which], refs.value[matched]

        # (candidate, reference) pairs: candidate c with each reference of its image, in order.
        ref_lo = refs.ref_start[images[cand_image]]
        per_cand = refs.ref_start[images[cand_image] + 1] - ref_lo
        pair_start = np.concatenate(([0], np.cumsum(per_cand))).astype(np.int64)
        num_pairs = int(pair_start[-1])
        c = cand[which]
        pair = pair_start[c] + refs.ref[matched] - ref_lo[c]
        # the toolkit's sim(): sum of min(vec_hyp, vec_ref) * vec_ref per order ("clipping")
        val = np.bincount(pair * ORDERS + gram[which] % ORDERS, weights=np.minimum(v_hyp, v_ref) * v_ref,
                          minlength=num_pairs * ORDERS).reshape(num_pairs, ORDERS)

        pair_cand = np.repeat(np.arange(num, dtype=np.int64), per_cand)
        pair_ref = _ranges(ref_lo, ref_lo + per_cand)
        norm_hyp, norm_ref = norm[pair_cand], refs.norm[pair_ref]
        nonzero = (norm_hyp != 0) & (norm_ref != 0)  # the toolkit divides only then
        val = np.where(nonzero, val / np.where(nonzero, norm_hyp * norm_ref, 1.0), val)
        # Gaussian length penalty on the difference of the bigram counts (the toolkit's "length")
        delta = (np.maximum(lengths - 1, 0)[pair_cand] - refs.length[pair_ref]).astype(np.float64)
        val *= (np.e ** (-(delta ** 2) / (2 * SIGMA ** 2)))[:, None]

        # mean over n, mean over the references, times 10
        total = np.add.reduceat(val, pair_start[:-1], axis=0)
        return total.mean(axis=1) / per_cand * 10.0


def bleu4(references: Sequence[Sequence[Caption]], candidates: Sequence[Caption]) -> np.ndarray:
    """The toolkit's per-caption BLEU-4 of ``candidates[i]`` against ``references[i]`` (token
    lists), float64: pycocoevalcap's ``BleuScorer`` with its "closest" reference length, the
    per-sentence scores ``captioner.evaluation.metrics`` sums into the corpus BLEU. Plain Python: an optional
    term of the SCST reward, not its fast path."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=ORDERS)
    for candidate, refs in zip(candidates, references):
        scorer += (" ".join(map(str, candidate)), [" ".join(map(str, r)) for r in refs])
    _, per_caption = scorer.compute_score(option="closest", verbose=0)
    return np.asarray(per_caption[ORDERS - 1], dtype=np.float64)


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The concatenation of arange(lo[i], hi[i]) over i, without a Python loop."""
    sizes = hi - lo
    total = int(sizes.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(lo - np.concatenate(([0], np.cumsum(sizes)[:-1])), sizes)
    return starts + np.arange(total, dtype=np.int64)
