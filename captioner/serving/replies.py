"""The demo's one function: a batch of requests in, a reply to each out, for every checkpoint.

Gradio's queue hands a batched function one list per input (the photos, then each decoding
control) and takes back one list per output (the message, then each checkpoint's caption, its
n-best table and, for an attention decoder, its attention strip). Requests that ask for the same
greedy or beam decoding are captioned together, so the encoder and each decoding step run once
for all of them; the captions are those each request would get alone (``captioner.caption`` on the
same photo and settings gives the same). A sampled request is drawn alone: the sampler's random
draws are shared by a batch, and a visitor's caption must not depend on who else is asking.

A request that cannot be captioned (a bad photo, a setting out of range) gets its message and
empty outputs; the others in its batch are answered as usual, and nothing is raised to the queue,
which would fail the whole batch.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from captioner.cli import describe_config_error
from captioner.config import decode_config
from captioner.decoding.captioner import Captioner
from captioner.evaluation.attention import strip
from captioner.serving.uploads import RequestError, read_upload

# The page's decoding controls, in the order the function takes them after the photo.
CONTROLS = ("method", "beam_size", "length_penalty", "n_best", "temperature", "top_k", "top_p")


class Demo:
    """Checkpoints (name -> Captioner, each loaded once) answering batches of requests: ``demo(photos,
    *controls)``, where a photo is Gradio's file payload ({"path", "orig_name", ...}) or None."""

    def __init__(self, captioners: Mapping[str, Captioner], decode, limits):
        self.captioners = dict(captioners)
        self.decode = decode  # what the controls leave as configured (max_length, alpha, seed, ...)
        self.limits = limits  # the ``demo`` config

    def outputs(self, captioner: Captioner) -> tuple[str, ...]:
        """What the page shows for one checkpoint, in the order the function returns it."""
        return ("caption", "n_best") + (("attention",) if captioner.attends else ())

    def settings(self, *controls) -> DictConfig:
        """The decoding config of one request's control values, or RequestError."""
        try:
            cfg = decode_config(self.decode, **dict(zip(CONTROLS, controls, strict=True)))
        except (ValueError, TypeError) as err:  # values the page's controls cannot send (an API client's)
            raise RequestError(describe_config_error(err)) from None
        if cfg.beam_size > self.limits.max_beam_size:
            raise RequestError(f"beam size {cfg.beam_size}: this demo allows at most {self.limits.max_beam_size}")
        return cfg

    def photo(self, payload: Optional[Mapping[str, Any]]):
        """The RGB image of one request's upload, or RequestError."""
        if not payload or not payload.get("path"):
            raise RequestError("no photo: upload one (or paste one, or take one with the webcam)")
        path = str(payload["path"])
        return read_upload(path, payload.get("orig_name") or Path(path).name, self.limits)

    def __call__(self, photos: Sequence, *controls: Sequence) -> list[list]:
        n = len(photos)
        messages, images, settings = [""] * n, [None] * n, [None] * n
        for i, payload in enumerate(photos):
            try:
                settings[i] = self.settings(*(column[i] for column in controls))
                images[i] = self.photo(payload)
            except RequestError as err:
                messages[i] = str(err)
        groups: dict[str, list[int]] = {}
        for i in (i for i in range(n) if images[i] is not None):
            same = f"sample {i}" if settings[i].method == "sample" else json.dumps(OmegaConf.to_container(settings[i]),
                                                                                 sort_keys=True)
            groups.setdefault(same, []).append(i)

        columns = [messages]
        for captioner in self.captioners.values():
            replies = {"caption": [""] * n, "n_best": [[] for _ in range(n)], "attention": [None] * n}
            for indices in groups.values():
                results = captioner.caption_images([images[i] for i in indices], settings[indices[0]],
                                                   batch_size=len(indices),
                                                   encoder_batch_size=self.limits.encoder_batch_size,
                                                   attention=captioner.attends)
                for i, result in zip(indices, results):
                    replies["caption"][i] = result["caption"]
                    replies["n_best"][i] = [[c["caption"], c["score"]] for c in result.get("n_best", [result])]
                    if captioner.attends:
                        replies["attention"][i] = strip(captioner.view(images[i]), result["words"],
                                                        result["attention"])
            columns += [replies[output] for output in self.outputs(captioner)]
        return columns
