"""How varied a model's captions are: self-critical training is known to shrink the vocabulary
and repeat stock phrases, which the corpus scores do not show.

Words are the vocabulary's (``captioner.data.tokenizer.tokenize``: lowercase, punctuation
dropped), so "A dog." and "a dog" are one caption.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

from captioner.data.tokenizer import tokenize


def diversity(captions: Sequence[str], training_captions: Iterable[str] = ()) -> dict[str, float]:
    """The variety of one caption per image:

    - ``vocabulary``: distinct words over all captions;
    - ``distinct_1``, ``distinct_2``: distinct words (bigrams) over all words (bigrams);
    - ``in_training``: the share of captions that are word for word a training caption (the
      complement of novelty);
    - ``shared``: the share of images whose caption some other image also got;
    - ``mean_length``: words per caption.
    """
    words = [tuple(tokenize(c)) for c in captions]
    if not words:
        raise ValueError("no captions to measure")
    unigrams = [w for caption in words for w in caption]
    bigrams = [pair for caption in words for pair in zip(caption, caption[1:])]
    seen = {tuple(tokenize(c)) for c in training_captions}
    times = Counter(words)
    return {
        "vocabulary": float(len(set(unigrams))),
        "distinct_1": len(set(unigrams)) / len(unigrams) if unigrams else 0.0,
        "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
        "in_training": sum(caption in seen for caption in words) / len(words),
        "shared": sum(times[caption] > 1 for caption in words) / len(words),
        "mean_length": len(unigrams) / len(words),
    }
