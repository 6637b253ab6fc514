"""Self-critical sequence training (Rennie et al. 2017): optimize the test metric directly.

Each step takes a batch of training images, draws ``samples`` captions per image from the model,
scores each against the image's references with CIDEr-D (document frequencies from the training
split, in the vocabulary's own ids, ``<eos>`` counted as self-critical.pytorch counts it), and
minimizes -(reward - baseline) x log p(caption), averaged over the samples. The baseline is the
mean reward of the image's other samples (``mean``, Luo 2020; no extra decode) or the reward of
a greedy decode (``greedy``, the original SCST). ``temperature`` < 1 makes the policy the model's
logits / T, sampled from and scored under that: a cross-entropy model's own samples are far worse
than its greedy captions, and at T = 1 the first epochs go into sharpening the distribution;
greedy decoding is the same at every temperature.

The samples are drawn without gradients and their log-probabilities computed in one
teacher-forced pass under the distribution they were drawn from (the tokens sampling never
emits left out, the rest renormalized: ``Decoder.sequence_logprobs``), which is exact when both
passes see the same weights: so dropout is off by default (``objective.dropout=true`` keeps it in
both passes, with different masks; the greedy baseline always decodes without it). Each
image's randomness comes from its own generator seeded by (train.seed, epoch, image), so N
processes draw what one process draws and a resumed run draws what the uninterrupted one drew.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from captioner.config import ObjectiveConfig, above, at_least, choice
from captioner.data.batches import Batch, ImageBatches
from captioner.data.tokenizer import tokenize
from captioner.data.vocab import EOS_ID
from captioner.decoding.search import as_tokens, draw, greedy
from captioner.objectives import OBJECTIVES
from captioner.objectives.base import Objective, ObjectiveOutput
from captioner.objectives.rewards import CiderD, bleu4


@dataclass
class ScstConfig(ObjectiveConfig):
    name: str = "scst"
    samples: int = at_least(5, 2)  # captions drawn per image
    temperature: float = above(1.0, 0.0)  # the policy is the model's logits / temperature (see above)
    baseline: str = choice("mean", ("mean", "greedy"))
    cider_weight: float = at_least(1.0, 0.0)
    bleu_weight: float = at_least(0.0, 0.0)  # a BLEU-4 term in the reward (the toolkit's per-caption BLEU-4)
    include_eos: bool = True  # <eos> appended to samples and references before counting n-grams
    dropout: bool = False

    @staticmethod
    def check(node):
        if node.cider_weight == 0 and node.bleu_weight == 0:
            return "cider_weight=0 and objective.bleu_weight=0: the reward would be 0; give one a weight"
        return None


@contextlib.contextmanager
def _dropout(model: torch.nn.Module, on: bool):
    """The model in training mode with (or without: eval mode) dropout for the block."""
    was_training = model.training
    model.train(on)
    try:
        yield
    finally:
        model.train(was_training)


@OBJECTIVES.register("scst", ScstConfig)
class SelfCritical(Objective):
    def __init__(self, cfg, vocab, records, decode_cfg):
        self.cfg, self.decode = cfg, decode_cfg
        self.image_ids = [r.image_id for r in records]
        self.references = reference_ids(vocab, records)
        self.cider = CiderD(self.references, include_eos=cfg.include_eos, eos=EOS_ID) if cfg.cider_weight else None

    @classmethod
    def from_config(cls, cfg, context) -> "SelfCritical":
        return cls(cfg, context.vocab, context.records, context.decode)

    def batches(self, features, context, cfg) -> ImageBatches:
        """Every training image once per epoch."""
        return ImageBatches.of_run(features, context, cfg)

    def rewards(self, image_ids: list, captions: list[list[int]]) -> np.ndarray:
        reward = np.zeros(len(captions))
        if self.cider is not None:
            reward += self.cfg.cider_weight * self.cider.score(image_ids, captions)
        if self.cfg.bleu_weight:
            reward += self.cfg.bleu_weight * bleu4([self.references[i] for i in image_ids], captions)
        return reward

    def __call__(self, model, batch: Batch) -> ObjectiveOutput:
        k, steps = self.cfg.samples, self.decode.max_length + 1
        features = batch.features.repeat_interleave(k, dim=0)
        uniforms = torch.stack([torch.rand(k, steps, generator=torch.Generator().manual_seed(int(seed)))
                                for seed in batch.seeds.tolist()]).view(-1, steps)
        image_ids = [self.image_ids[row] for row in batch.rows.tolist()]
        max_length, ban_unk = self.decode.max_length, self.decode.ban_unk
        with _dropout(model, self.cfg.dropout):
            drawn = draw(model, batch.features, uniforms.to(features.device), max_length=max_length, ban_unk=ban_unk,
                         temperature=self.cfg.temperature, copies=k)
            logprobs = model.sequence_logprobs(features, as_tokens(drawn.sequences, features.device),
                                               temperature=self.cfg.temperature, max_length=max_length,
                                               ban_unk=ban_unk)
        # rows i*k .. i*k + k-1 are image i's samples (repeat_interleave above)
        reward = self.rewards([i for i in image_ids for _ in range(k)], drawn.sequences).reshape(-1, k)
        if self.cfg.baseline == "mean":
            baseline = mean_of_others(reward)
        else:
            with _dropout(model, False), torch.no_grad():  # the baseline is the deterministic greedy caption
                decoded = greedy(model, batch.features, max_length=max_length, ban_unk=ban_unk, block_trigrams=False)
            baseline = np.repeat(self.rewards(image_ids, decoded.sequences)[:, None], k, axis=1)
        advantage = torch.from_numpy((reward - baseline).reshape(-1)).to(logprobs)
        loss = -(advantage * logprobs).mean()
        lengths = [len(s) for s in drawn.sequences]
        return ObjectiveOutput(loss, len(lengths), {"reward": float(reward.mean()), "baseline": float(baseline.mean()),
                                                    "sample_length": float(np.mean(lengths))})


def mean_of_others(reward: np.ndarray) -> np.ndarray:
    """Each sample's baseline [B, k]: the mean reward of the same image's other k - 1 samples
    (``reward`` [B, k], one row per image)."""
    k = reward.shape[1]
    return (reward.sum(axis=1, keepdims=True) - reward) / (k - 1)


def reference_ids(vocab, records) -> dict:
    """Each image's reference captions as token ids, a word outside the vocabulary getting an id
    of its own above it rather than <unk>'s: a sampled <unk> then matches nothing, as the word
    "<unk>" matches nothing when the toolkit scores text. (Encoded as <unk>, references would pay
    the model for writing <unk> wherever a rare word belongs.)"""
    rare: dict[str, int] = {}

    def word_id(word: str) -> int:
        known = vocab.stoi.get(word)
        return known if known is not None else rare.setdefault(word, len(vocab) + len(rare))

    return {r.image_id: [[word_id(w) for w in tokenize(c)] for c in r.captions] for r in records}
