"""Decoding captions from image features: greedy, sampling and batched beam search.

Works through the decoding protocol only: ``init_state(features) -> state``,
``next_logprobs(tokens, state) -> (log-probabilities [B, V], state)`` and
``reorder_state(state, index)``. Every decoder has it from ``captioner.models.base.Decoder``, an
ensemble from ``captioner.decoding.ensemble``; every caller (validation, ``evaluate``, captioning
a folder, SCST's samples) goes through ``generate`` or the functions below.

Conventions shared by every method, so their outputs compare:

- ``max_length`` is the most *words* a caption may have (as ``data.max_length`` counts them
  for training: <bos>/<eos> not included). A hypothesis that reaches it is closed with <eos>:
  at that step every other token is banned. So every caption ends with <eos>, a caption takes
  at most ``max_length + 1`` steps, and every score is comparable.
- A score is the model's log-probability of the caption *including* its <eos> (the model chose
  to stop, and that choice has a probability). Scores are raw log-probabilities of the model: a
  banned token or a sampling filter changes what can be chosen, never renormalizes the score.
  The one exception changes the model's distribution itself: with ``repetition_penalty`` the
  distribution searched is the penalized, renormalized one (``penalize_repeats``), and scores are
  log-probabilities under it, so they stay the probabilities of what was actually chosen from.
- Length for the length penalty counts the <eos>: ``len(words) + 1``, the number of scored tokens.
- <pad> and <bos> are never emitted (a trained model gives them ~0 probability, but an
  untrained one would otherwise produce captions with invisible tokens).
- Optional constraints, for every method: ``ban_unk`` (never emit <unk>) and ``block_trigrams``
  (never emit a word that repeats a trigram already in the caption; <eos> is never blocked).
- ``repetition_penalty`` (every method, 1: off): a word's probability is divided by it once per
  earlier occurrence in the caption; special tokens never count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from captioner.config import decode_config
from captioner.data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID

SPECIAL_IDS = [PAD_ID, BOS_ID, EOS_ID, UNK_ID]  # not words: a repetition penalty never counts them


@dataclass
class DecodeOutput:
    sequences: list[list[int]]  # best caption per image: word ids without <bos>/<eos>
    scores: list[float]  # its total log-probability (after any length penalty)
    n_best: Optional[list[list[tuple[list[int], float]]]] = None  # beam with n_best > 1: best first


# -- constraints shared by all methods -------------------------------------------------------
def constrain(logprobs: torch.Tensor, history: torch.Tensor, max_length: int,
              ban_unk: bool = False, block_trigrams: bool = False) -> torch.Tensor:
    """``logprobs`` [N, V] with banned next tokens set to -inf, in place (every caller passes a
    model step's fresh output: a copy of [N, V] each step costs as much as the softmax), for rows
    whose words so far are ``history`` [N, t] (all rows have the same length t)."""
    words = history.size(1)
    if words >= max_length:  # the caption is full: only <eos> may follow
        eos = logprobs[:, EOS_ID].clone()
        logprobs.fill_(-math.inf)
        logprobs[:, EOS_ID] = eos
        return logprobs
    logprobs[:, PAD_ID] = -math.inf
    logprobs[:, BOS_ID] = -math.inf
    if ban_unk:
        logprobs[:, UNK_ID] = -math.inf
    if block_trigrams and words >= 3:
        # Adding w makes the trigram (h[t-2], h[t-1], w); it repeats when an earlier pair
        # (h[i], h[i+1]) equals (h[t-2], h[t-1]), and then w = h[i+2] is banned.
        match = (history[:, : words - 2] == history[:, words - 2 : words - 1]) & (
            history[:, 1 : words - 1] == history[:, words - 1 :]
        )
        hits = torch.zeros(logprobs.shape, dtype=torch.int32, device=logprobs.device)
        hits.scatter_add_(1, history[:, 2:], match.to(torch.int32))  # add, not assign: a word can recur
        logprobs.masked_fill_(hits > 0, -math.inf)
    return logprobs


def penalize_repeats(logprobs: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """The next-token distribution with each word's probability divided by ``penalty`` once per
    occurrence of it in the row's ``history`` [N, t] (special tokens never count), renormalized:
    ``log_softmax(logprobs - count * log(penalty))`` for ``logprobs`` [N, V]. Applied before
    ``constrain``, so a banned token still bans without renormalizing. ``penalty`` 1 returns
    ``logprobs`` itself: decoding without a penalty is unchanged to the bit."""
    if penalty == 1.0:
        return logprobs
    counts = torch.zeros_like(logprobs).scatter_add_(1, history, torch.ones_like(history, dtype=logprobs.dtype))
    counts[:, SPECIAL_IDS] = 0
    return torch.log_softmax(logprobs - math.log(penalty) * counts, dim=-1)


def without_banned(logits: torch.Tensor, words: torch.Tensor, max_length: int, ban_unk: bool = False) -> torch.Tensor:
    """``logits`` [n, V] with the tokens ``constrain`` bans (trigram blocking aside) at -inf, for
    rows whose captions so far have ``words`` [n] words: what a teacher-forced pass needs to score
    captions under the very distribution decoding chose them from (``Decoder.sequence_logprobs``).
    Out of place (the caller's logits may be needed by their own backward), in one copy: the
    banned columns, then the full captions' rows, where only <eos> may follow."""
    banned = torch.tensor([PAD_ID, BOS_ID, *([UNK_ID] if ban_unk else [])], device=logits.device)
    logits = logits.index_fill(1, banned, -math.inf)
    full = (words >= max_length).nonzero().squeeze(1)
    if full.numel():
        eos_only = torch.full((full.numel(), logits.size(1)), -math.inf, dtype=logits.dtype, device=logits.device)
        eos_only[:, EOS_ID] = logits[full, EOS_ID]
        logits[full] = eos_only  # in place on our own copy: index_fill's backward does not read it
    return logits


# -- greedy and sampling: one token per image per step ----------------------------------------
def _decode_one_path(model, features, max_length, choose, ban_unk, block_trigrams,
                     repetition_penalty, copies: int = 1) -> DecodeOutput:
    """Shared loop of greedy and sampling: ``choose(logprobs, rows, t) -> tokens`` picks one token
    for each of ``rows`` (the indices of the captions still being written) at step t. With
    ``copies``, each image writes that many captions (rows i*copies .. i*copies + copies-1) from
    one state built once per image. A caption that reaches <eos> leaves the batch (its state rows
    are dropped through ``reorder_state``), so later steps compute only the unfinished ones."""
    device = features.device
    state = model.init_state(features)
    if copies > 1:
        state = model.reorder_state(state, torch.arange(features.size(0), device=device).repeat_interleave(copies))
    batch = features.size(0) * copies
    rows = torch.arange(batch, device=device)
    tokens = torch.full((batch,), BOS_ID, dtype=torch.long, device=device)
    history = torch.full((batch, max_length + 1), PAD_ID, dtype=torch.long, device=device)
    scores = None
    for t in range(max_length + 1):
        logprobs, state = model.next_logprobs(tokens, state)
        if scores is None:
            scores = torch.zeros(batch, dtype=logprobs.dtype, device=device)
        words = history[rows, :t]
        logprobs = constrain(penalize_repeats(logprobs, words, repetition_penalty), words, max_length, ban_unk,
                             block_trigrams)
        tokens = choose(logprobs, rows, t)
        scores.index_add_(0, rows, logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1))
        history[rows, t] = tokens
        ended = tokens == EOS_ID
        if bool(ended.any()):
            writing = (~ended).nonzero().squeeze(1)
            if writing.numel() == 0:
                break
            rows, tokens = rows[writing], tokens[writing]
            state = model.reorder_state(state, writing)
    sequences = [_words(seq) for seq in history.tolist()]
    return DecodeOutput(sequences, scores.tolist())


def as_tokens(sequences: list[list[int]], device=None) -> torch.Tensor:
    """<bos> w1 .. wn <eos>, padded, for each caption: the teacher-forcing input of decoded captions."""
    tokens = torch.full((len(sequences), max(map(len, sequences)) + 2), PAD_ID, dtype=torch.long)
    for i, words in enumerate(sequences):
        tokens[i, : len(words) + 2] = torch.tensor([BOS_ID, *words, EOS_ID])
    return tokens.to(device)


def _words(seq: list[int]) -> list[int]:
    return seq[: seq.index(EOS_ID)] if EOS_ID in seq else seq


@torch.no_grad()
def greedy(model, features: torch.Tensor, *, max_length: int, ban_unk: bool, block_trigrams: bool,
           repetition_penalty: float = 1.0) -> DecodeOutput:
    """The most likely next token at every step (the first one on an exact tie)."""
    return _decode_one_path(model, features, max_length, lambda lp, rows, t: lp.argmax(dim=-1), ban_unk,
                            block_trigrams, repetition_penalty)


@torch.no_grad()
def draw(model, features: torch.Tensor, uniforms: torch.Tensor, *, max_length: int, ban_unk: bool = False,
         block_trigrams: bool = False, temperature: float = 1.0, copies: int = 1) -> DecodeOutput:
    """Sample each token from the model's distribution (its log-probabilities divided by
    ``temperature``) by inverse CDF, caption i's step t reading ``uniforms[i, t]``
    ([N x copies, max_length + 1] in [0, 1)): the randomness is the caller's, so it can be a
    function of (seed, step, image) rather than of the process or the batch layout. ``copies``
    captions per image (SCST's samples: rows i*copies .. i*copies + copies-1 are image i's) share
    the image's initial state, built once (region keys and the like are per image, not per
    sample)."""
    def choose(logprobs, rows, t):
        logits = logprobs.float() if temperature == 1.0 else logprobs.float() / temperature
        cdf = logits.exp().cumsum(dim=-1)
        # (above 0: u = 0 would pick token 0, <pad>, whose probability is 0)
        u = uniforms[rows, t].to(cdf)[:, None].clamp(min=1e-12) * cdf[:, -1:]
        return torch.searchsorted(cdf, u).squeeze(1).clamp_(max=cdf.size(1) - 1)

    # no repetition penalty: SCST samples with draw, and sequence_logprobs scores its policy without one
    return _decode_one_path(model, features, max_length, choose, ban_unk, block_trigrams, 1.0, copies)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the ``top_k`` most likely tokens (0: all), then the smallest set of those whose
    probability reaches ``top_p`` (nucleus); the rest become -inf. The most likely token is
    always kept."""
    if 0 < top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        drop = before >= top_p  # the set already reached top_p without this token
        logits = logits.masked_fill(drop.scatter(1, order, drop), -math.inf)
    return logits


@torch.no_grad()
def sample(model, features: torch.Tensor, *, max_length: int, temperature: float, top_k: int, top_p: float,
           seed: int, ban_unk: bool, block_trigrams: bool, repetition_penalty: float = 1.0) -> DecodeOutput:
    """Draw each token from the model's distribution: divided by ``temperature``, then filtered by
    ``top_k`` and ``top_p``. A private generator seeded with ``seed`` makes a run reproducible
    (same seed, batch and device: same captions) without touching the global RNG."""
    generator = torch.Generator(device=features.device).manual_seed(int(seed))

    def choose(logprobs, rows, t):
        logits = filter_logits(logprobs / temperature, top_k, top_p)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return _decode_one_path(model, features, max_length, choose, ban_unk, block_trigrams, repetition_penalty)


# -- beam search --------------------------------------------------------------------------------
def length_penalty_fn(kind: str, alpha: float = 0.7):
    """Divisor of the log-probability for a hypothesis of ``length`` scored tokens (<eos> included)."""
    if kind == "none":
        return lambda length: 1.0
    if kind == "average":
        return lambda length: float(length)
    return lambda length: ((5.0 + length) / 6.0) ** alpha  # gnmt (Wu et al. 2016)


def best_future_score(score, words: int, max_length: int, penalty) -> float | torch.Tensor:
    """Upper bound on the penalized score of any finished hypothesis grown from an active one
    with raw ``score`` and ``words`` words: it ends with length in [words + 1, max_length + 1]
    and a raw score <= ``score`` <= 0, and for a divisor monotone in length the best is at
    one end of that range."""
    if isinstance(score, torch.Tensor):
        return torch.maximum(score / penalty(words + 1), score / penalty(max_length + 1))
    return max(score / penalty(words + 1), score / penalty(max_length + 1))


@torch.no_grad()
def beam_search(model, features: torch.Tensor, *, beam_size: int, max_length: int, length_penalty: str,
                alpha: float, n_best: int, ban_unk: bool, block_trigrams: bool, groups: int = 1,
                diversity: float = 0.0, repetition_penalty: float = 1.0) -> DecodeOutput:
    """Beam search over all images at once: every step is one ``model.next_logprobs`` on [images * K] rows.

    The K = ``beam_size`` hypotheses of an image form G = ``groups`` groups of W = K / G (G = 1:
    one group, plain beam search), each searched as a beam of its own; with G > 1 it is diverse
    beam search (Vijayakumar et al. 2018, as self-critical.pytorch's group_size and
    diversity_lambda). Per image, at step t (the active hypotheses have t words):

    1. The groups choose in order g = 0 .. G-1. Every active hypothesis h of group g and token w
       make a candidate with search score ``score(h) + log p(w | h) - diversity * c(w)``, c(w)
       the number of live hypotheses of groups 0 .. g-1 that w continues at this step (Hamming
       diversity: 0 for group 0, so G = 1 is beam search on the model's log-probabilities);
       banned tokens: -inf; at t = max_length only <eos>.
    2. The 2W best candidates of the group by search score are taken, best first (``topk``: exact
       float ties come in no promised order). An <eos> candidate among the first W of them is
       finished (its penalized score ``score / penalty(t + 1)``); an <eos> ranked W..2W-1 is
       dropped, as it would not have made the beam. The first W non-<eos> candidates (there are
       at least W: each hypothesis has one <eos>) become the group's next active hypotheses;
       -inf ones are dead slots. A finished hypothesis is never extended.
    3. Each group's finished pool keeps its W best by penalized search score (on ties, the earlier one).
    4. The image is done when no group can improve its pool: no active hypothesis of the group can
       reach a penalized search score above the worst of its full pool (``best_future_score <=
       worst``; with no penalty the score itself, since log-probabilities only fall) or it has
       none left; or after step t = max_length, which closes every hypothesis. Until then every
       group advances (a group that cannot improve its pool still steers the later ones); done
       images leave the batch.

    A hypothesis's search score includes the diversity terms it was chosen under; its own score
    (what is reported) is the log-probability of its tokens alone, under the distribution
    searched (the repetition-penalized one with ``repetition_penalty``; see ``penalize_repeats``).
    Returns the best finished hypothesis per image by own penalized score and, when ``n_best >
    1``, the ``n_best`` best of all groups' pools by it, best first (a caption two groups both
    found is there once per group: with ``diversity`` 0 every group finds the same ones).
    """
    penalty = length_penalty_fn(length_penalty, alpha)
    k, batch, device = beam_size, features.size(0), features.device
    width = k // groups
    arange_k, arange_g = torch.arange(k, device=device), torch.arange(groups, device=device)

    state = model.init_state(features)
    state = model.reorder_state(state, torch.arange(batch, device=device).repeat_interleave(k))
    alive = torch.arange(batch, device=device)  # original index of each image still searching
    tokens = torch.full((batch * k,), BOS_ID, dtype=torch.long, device=device)
    history = torch.zeros((batch * k, 0), dtype=torch.long, device=device)
    # [alive * G, W] search and own scores, a row per group (image i's group g: row i * G + g); set
    # from the first step's dtype
    scores = own = None

    # the finished pool per group (the same rows), sorted best first by search score; -inf marks an empty slot
    pool_words = torch.full((batch * groups, width, max_length), PAD_ID, dtype=torch.long, device=device)
    pool_length = torch.zeros((batch * groups, width), dtype=torch.long, device=device)
    pool_score = pool_own = None

    for t in range(max_length + 1):
        n = alive.numel()
        m = n * groups
        searching = (alive[:, None] * groups + arange_g).view(-1)  # the pool rows of the groups of alive images
        logprobs, state = model.next_logprobs(tokens, state)
        logprobs = constrain(penalize_repeats(logprobs, history, repetition_penalty), history, max_length, ban_unk,
                             block_trigrams)
        vocab = logprobs.size(1)
        if scores is None:  # one live hypothesis per group to start: the others are empty slots
            scores = torch.full((m, width), -math.inf, dtype=logprobs.dtype, device=device)
            scores[:, 0] = 0.0
            own = scores.clone()
            pool_score = torch.full((batch * groups, width), -math.inf, dtype=logprobs.dtype, device=device)
            pool_own = pool_score.clone()
        logprobs = logprobs.reshape(m, width * vocab)
        top, flat, keep = _groups_choose(scores, logprobs.view(n, groups, width, vocab), diversity)
        parent, word = flat // vocab, flat % vocab
        top_own = own.gather(1, parent) + logprobs.gather(1, flat)
        is_eos = word == EOS_ID

        # 2. finished: <eos> among the first W candidates
        not_eos = ~is_eos[:, :width]
        new_score = top[:, :width].masked_fill(not_eos, -math.inf)
        new_own = top_own[:, :width].masked_fill(not_eos, -math.inf)
        new_words = history.view(m, width, t).gather(1, parent[:, :width, None].expand(m, width, t))
        new_words = torch.nn.functional.pad(new_words, (0, max_length - t), value=PAD_ID)
        # 3. merge into the pool: the old entries come first, so a tie keeps the earlier one
        merged_score = torch.cat([pool_score[searching], new_score / penalty(t + 1)], dim=1)
        merged_own = torch.cat([pool_own[searching], new_own / penalty(t + 1)], dim=1)
        merged_words = torch.cat([pool_words[searching], new_words], dim=1)
        merged_length = torch.cat([pool_length[searching], torch.full_like(new_score, t, dtype=torch.long)], dim=1)
        order = _stable_top(merged_score, width)
        pool_score[searching] = merged_score.gather(1, order)
        pool_own[searching] = merged_own.gather(1, order)
        pool_words[searching] = merged_words.gather(1, order[:, :, None].expand(m, width, max_length))
        pool_length[searching] = merged_length.gather(1, order)
        if t == max_length:  # every hypothesis was closed with <eos>
            break

        # 2. continuing: the first W non-<eos> candidates, in rank order
        scores, own = top.gather(1, keep), top_own.gather(1, keep)
        rows = (torch.arange(m, device=device)[:, None] * width + parent.gather(1, keep)).view(-1)
        tokens = word.gather(1, keep).view(-1)
        history = torch.cat([history[rows], tokens[:, None]], dim=1)
        state = model.reorder_state(state, rows)

        # 4. done images leave the batch
        bound = best_future_score(scores.max(dim=1).values, t + 1, max_length, penalty)
        done = (bound <= pool_score[searching, width - 1]).view(n, groups).all(dim=1)
        if bool(done.any()):
            stay = (~done).nonzero().squeeze(1)
            if stay.numel() == 0:
                break
            rows = (stay[:, None] * k + arange_k).view(-1)
            stay_groups = (stay[:, None] * groups + arange_g).view(-1)
            alive, scores, own = alive[stay], scores[stay_groups], own[stay_groups]
            tokens, history = tokens[rows], history[rows]
            state = model.reorder_state(state, rows)

    return _beam_output(pool_words.view(batch, k, max_length).tolist(), pool_length.view(batch, k).tolist(),
                        pool_own.view(batch, k).tolist(), n_best)


def _groups_choose(scores: torch.Tensor, logprobs: torch.Tensor, diversity: float):
    """Steps 1 and 2 of ``beam_search`` for every group, in order: for ``scores`` [n * G, W] and
    ``logprobs`` [n, G, W, V], the 2W best candidates of each group by search score, best first
    (their scores and indices into W * V, each [n * G, 2W]), and which of them are its first W
    non-<eos> ones, the group's next active hypotheses ([n * G, W])."""
    n, groups, width, vocab = logprobs.shape
    scores = scores.view(n, groups, width, 1)
    chosen = torch.zeros((n, 1, vocab), dtype=logprobs.dtype, device=logprobs.device)  # c(w) of the next group
    tops, flats, keeps = [], [], []
    for g in range(groups):
        lowered = logprobs[:, g] - diversity * chosen if g > 0 else logprobs[:, g]
        top, flat = (scores[:, g] + lowered).view(n, width * vocab).topk(2 * width, dim=1)
        keep = _stable_top((flat % vocab != EOS_ID).to(torch.int8), width)
        if g + 1 < groups:
            live = top.gather(1, keep) > -math.inf
            chosen.scatter_add_(2, (flat.gather(1, keep) % vocab)[:, None], live[:, None].to(chosen.dtype))
        tops.append(top)
        flats.append(flat)
        keeps.append(keep)
    return tuple(torch.stack(parts, dim=1).view(n * groups, -1) for parts in (tops, flats, keeps))


def _stable_top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest per row, earlier index first among equals."""
    return values.sort(dim=1, descending=True, stable=True).indices[:, :k]


def _beam_output(words, lengths, scores, n_best) -> DecodeOutput:
    """Each image's pools (its groups' in turn, each best first) as the best caption and the n best
    by ``scores``; the sort is stable, so one group's pool, already in order, comes out as it is."""
    sequences, best_scores, lists = [], [], []
    for image_words, image_lengths, image_scores in zip(words, lengths, scores):
        found = [(w[:n], s) for w, n, s in zip(image_words, image_lengths, image_scores) if s > -math.inf]
        found.sort(key=lambda caption: -caption[1])
        if not found:  # every candidate was banned: nothing to say (not reachable with <eos> allowed)
            found = [([], -math.inf)]
        sequences.append(found[0][0])
        best_scores.append(found[0][1])
        lists.append(found[:n_best])
    return DecodeOutput(sequences, best_scores, lists if n_best > 1 else None)


# -- the one entry point ---------------------------------------------------------------------
def generate(model, features: torch.Tensor, method: str = "greedy", **options) -> DecodeOutput:
    """Decode a batch of image features [B, D] with ``method`` (greedy | sample | beam).

    ``options`` are the ``decode`` config's fields, its schema's defaults where not given (one
    place: ``captioner.config.DecodeConfig``), checked there; each method takes those it uses and
    ignores the others (greedy ignores beam_size, ...), so one config serves every method.
    A name that is no ``decode`` field at all is an error rather than silently ignored.
    """
    cfg = decode_config(options, method=method)
    common = {"max_length": cfg.max_length, "ban_unk": cfg.ban_unk, "block_trigrams": cfg.block_trigrams,
              "repetition_penalty": cfg.repetition_penalty}
    if cfg.method == "greedy":
        return greedy(model, features, **common)
    if cfg.method == "sample":
        return sample(model, features, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed,
                      **common)
    return beam_search(model, features, beam_size=cfg.beam_size, length_penalty=cfg.length_penalty, alpha=cfg.alpha,
                       n_best=cfg.n_best, groups=cfg.groups, diversity=cfg.diversity, **common)
