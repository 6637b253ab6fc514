"""From image features, or images, to captions: ``decode_features`` decodes rows of a feature array
with the decoding protocol, and ``Captioner`` (a checkpoint's decoder with the encoder it was
trained on) captions images: the path of ``captioner.caption``, of validation and of
``captioner.evaluate``.

    from captioner import Captioner
    captioner = Captioner.from_checkpoint("outputs/train/<run>/best.pt")
    captioner.caption_images(["a.jpg", pil_image], method="beam", beam_size=5)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms.functional import to_pil_image
from tqdm import tqdm

from captioner.config import decode_config
from captioner.data.vocab import EOS, Vocabulary
from captioner.decoding.search import as_tokens
from captioner.encoding.features import encode_images
from captioner.runtime import resolve_device
from captioner.training.restore import restore_model


@torch.no_grad()
def decode_features(model, features: np.ndarray, vocab: Vocabulary, decode_cfg, device,
                    progress: bool = False, attention: bool = False) -> list[dict]:
    """Captions for every row of ``features``: [{"row", "caption", "score", "n_best"?}]; with
    ``attention`` (an attention decoder) also "words" (the caption's, then <eos>) and "attention",
    the weights [len(words), regions] the model gave the regions before each."""
    model.eval()
    options = {k: v for k, v in dict(decode_cfg).items() if k not in ("method", "batch_size")}
    outputs = []
    batch_size = decode_cfg.batch_size
    for start in tqdm(range(0, len(features), batch_size), desc="decoding", disable=not progress, leave=False):
        batch = torch.from_numpy(np.asarray(features[start : start + batch_size], dtype=np.float32)).to(device)
        out = model.generate(batch, method=decode_cfg.method, **options)
        maps = model.attention_maps(batch, as_tokens(out.sequences, device)).cpu().numpy() if attention else None
        for i, (seq, score) in enumerate(zip(out.sequences, out.scores)):
            item = {"row": start + i, "caption": vocab.decode(seq), "score": float(score)}
            if out.n_best is not None:
                item["n_best"] = [{"caption": vocab.decode(s), "score": float(sc)} for s, sc in out.n_best[i]]
            if maps is not None:
                item["words"] = [vocab.itos[w] for w in seq] + [EOS]
                item["attention"] = maps[i, : len(seq) + 1]
            outputs.append(item)
    return outputs


class CaptionError(ValueError):
    """A problem the user can fix (no images, no checkpoint, ...); the commands print it as one line."""


class Captioner:
    """A trained decoder with the encoder it was trained on: images in, captions out."""

    def __init__(self, model, vocab, encoder, device: str | torch.device = "cpu", feature_dtype: str = "float32"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.encoder = encoder.to(self.device).eval()
        self.vocab = vocab
        # Training decodes features cached at this precision; rounding ours the same way makes a
        # caption here identical to the one `evaluate` gives for the same image.
        self.feature_dtype = getattr(torch, feature_dtype)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto") -> "Captioner":
        """Load the decoder, vocabulary and encoder settings from a training checkpoint.

        Raises ``CheckpointError`` (missing, unsafe or mismatched file) or
        ``WeightsUnavailableError`` (encoder weights cannot be found), each with a one-line message.
        """
        device = resolve_device(device)
        # Building modules draws their initial weights from the global RNG: fork it, so loading a
        # captioner leaves the caller's random state alone. The encoder (random weights from the
        # training seed with pretrained=false, in tests; fine-tuned ones when the checkpoint has
        # them) comes from restore_model too.
        with torch.random.fork_rng(devices=[]):
            restored = restore_model(path, device, with_encoder=True)
        return cls(restored.model, restored.vocab, restored.encoder, device,
                   OmegaConf.select(restored.config, "encoder.cache_dtype", default="float32"))

    @property
    def attends(self) -> bool:
        """Whether the decoder attends over image regions (and so has attention maps to show)."""
        return bool(getattr(self.model, "attends", False))

    def view(self, image: Image.Image) -> Image.Image:
        """The part of ``image`` the encoder reads (resized, centre-cropped): what attention maps cover."""
        return to_pil_image(self.encoder.crop(image.convert("RGB")))

    @torch.no_grad()
    def caption_images(self, images: Sequence[str | Path | Image.Image], decode: Any = None, *,
                       batch_size: int = 16, encoder_batch_size: Optional[int] = None, num_workers: int = 0,
                       progress: bool = False, on_error: Optional[Callable[[int, str], None]] = None,
                       attention: bool = False, **decode_options) -> list[dict]:
        """One dict per input, in order: ``{"file_name", "caption", "score"}`` (plus ``n_best``:
        ``[{"caption", "score"}]`` when ``n_best > 1``), or ``{"file_name", "error"}`` for an
        input that cannot be read. Inputs are paths or PIL images (``file_name`` is then the file
        it was opened from, or None). ``decode`` and ``decode_options`` are ``decode`` config
        fields (method, beam_size, ...); the defaults are ``DecodeConfig``'s (greedy).
        ``on_error(index, message)`` is called as each unreadable input is found. ``attention``
        (an attention decoder) adds "words" and "attention", each word's map over the regions.
        The decoder takes ``batch_size`` images at a time, the encoder ``encoder_batch_size``
        (default the same): on a CPU a CNN can run up to twice as slow per image in large
        batches, whose activations no longer fit in its caches, while the decoder's steps still
        gain from them."""
        cfg = decode_config(decode, **decode_options)
        if attention and not self.attends:
            raise CaptionError(f"attention=true needs an attention checkpoint (a decoder with attends = True, "
                               f"such as model.name=show_attend_tell); "
                               f"this one's decoder is {type(self.model).__name__}")
        images = list(images)
        results: list[Optional[dict]] = [None] * len(images)

        def name(index: int) -> Optional[str]:
            image = images[index]
            if isinstance(image, Image.Image):
                return getattr(image, "filename", None) or None
            return str(image)

        encoded_indices: list[int] = []
        encoded_rows: list[np.ndarray] = []

        def decode_encoded(count: int) -> int:
            decoded = decode_features(self.model, np.stack(encoded_rows[:count]), self.vocab, cfg, self.device,
                                      attention=attention)
            for index, item in zip(encoded_indices[:count], decoded):
                item.pop("row")
                results[index] = {"file_name": name(index), **item}
            del encoded_indices[:count], encoded_rows[:count]
            return count

        with tqdm(total=len(images), desc="captioning", unit="img", disable=not progress) as bar:
            for indices, feats, bad in encode_images(self.encoder, images, encoder_batch_size or batch_size,
                                                     num_workers, self.device):
                for index, error in bad:
                    error = " ".join(str(error).split())  # one line, whatever the decoder said
                    results[index] = {"file_name": name(index), "error": error}
                    if on_error is not None:
                        on_error(index, error)
                bar.update(len(bad))
                if feats is not None:
                    encoded_indices.extend(indices)
                    encoded_rows.extend(feats.to(self.feature_dtype).cpu().numpy())  # the cache's precision
                while len(encoded_indices) >= batch_size:
                    bar.update(decode_encoded(batch_size))
            if encoded_indices:
                bar.update(decode_encoded(len(encoded_indices)))
        return results
