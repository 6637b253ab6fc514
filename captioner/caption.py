"""Caption a folder of images with a trained checkpoint.

    python -m captioner.caption FOLDER checkpoint=PATH [decode=beam decode.beam_size=5 ...]
                                [html=true] [attention=true] [output=captions.json]

Finds images under FOLDER recursively, captions them in batches and writes ``captions.json``
(the COCO results format, ``[{"image_id", "caption"}]``, plus ``file_name`` relative to FOLDER,
``score``, and ``n_best`` when ``decode.n_best > 1``); ``html=true`` also writes a self-contained
gallery page beside it, which for an attention decoder shows each word of a caption with where
the model looked (``captioner.attention``); ``attention=true`` writes the same strip as one PNG
per image into ``<output stem>_attention/``. Unreadable files are skipped with one warning line
each and listed at the end; a run with nothing to caption exits non-zero with one line.

From Python, the same path::

    from captioner import Captioner
    captioner = Captioner.from_checkpoint("outputs/train/<run>/best.pt")
    captioner.caption_images(["a.jpg", pil_image], method="beam", beam_size=5)
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from captioner.cli import UsageError, command
from captioner.config import decode_config, validate
from captioner.io import atomic_write_text
from captioner.runtime import resolve_device

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class CaptionError(UsageError):
    """A problem the user can fix (no images, no checkpoint, ...); the CLI prints it as one line."""


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
        from captioner.checkpoint import restore_model

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
        return bool(getattr(self.model, "reads_grid", False))

    def view(self, image: Image.Image) -> Image.Image:
        """The part of ``image`` the encoder reads (resized, centre-cropped): what attention maps cover."""
        from torchvision.transforms.functional import to_pil_image

        return to_pil_image(self.encoder.crop(image.convert("RGB")))

    @torch.no_grad()
    def caption_images(self, images: Sequence[str | Path | Image.Image], decode: Any = None, *,
                       batch_size: int = 16, num_workers: int = 0, progress: bool = False,
                       on_error: Optional[Callable[[int, str], None]] = None, attention: bool = False,
                       **decode_options) -> list[dict]:
        """One dict per input, in order: ``{"file_name", "caption", "score"}`` (plus ``n_best``:
        ``[{"caption", "score"}]`` when ``n_best > 1``), or ``{"file_name", "error"}`` for an
        input that cannot be read. Inputs are paths or PIL images (``file_name`` is then the file
        it was opened from, or None). ``decode`` and ``decode_options`` are ``decode`` config
        fields (method, beam_size, ...); the defaults are ``DecodeConfig``'s (greedy).
        ``on_error(index, message)`` is called as each unreadable input is found. ``attention``
        (an attention decoder) adds "words" and "attention", each word's map over the regions."""
        from tqdm import tqdm

        from captioner.engine import decode_features
        from captioner.features import encode_images

        cfg = decode_config(decode, **decode_options)
        if attention and not self.attends:
            raise CaptionError(f"attention=true needs an attention checkpoint (model.name=show_attend_tell); "
                               f"this one's decoder is {type(self.model).__name__}")
        images = list(images)
        results: list[Optional[dict]] = [None] * len(images)

        def name(index: int) -> Optional[str]:
            image = images[index]
            if isinstance(image, Image.Image):
                return getattr(image, "filename", None) or None
            return str(image)

        with tqdm(total=len(images), desc="captioning", unit="img", disable=not progress) as bar:
            for indices, feats, bad in encode_images(self.encoder, images, batch_size, num_workers, self.device):
                for index, error in bad:
                    error = " ".join(str(error).split())  # one line, whatever the decoder said
                    results[index] = {"file_name": name(index), "error": error}
                    if on_error is not None:
                        on_error(index, error)
                if feats is not None:
                    rows = feats.to(self.feature_dtype).cpu().numpy()  # the cache's precision
                    decoded = decode_features(self.model, rows, self.vocab, cfg, self.device, attention=attention)
                    for index, item in zip(indices, decoded):
                        item.pop("row")
                        results[index] = {"file_name": name(index), **item}
                bar.update(len(indices) + len(bad))
        return results


# -- the command line --------------------------------------------------------------------------
def find_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """(files with an image extension, other files) under ``folder``, recursively, sorted."""
    images, others = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        (images if path.suffix.lower() in IMAGE_EXTENSIONS else others).append(path)
    return images, others


def _warn(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)  # above the progress bar, not through it


def caption_folder(cfg: DictConfig) -> dict:
    """Caption ``cfg.folder`` and write the outputs; returns a summary. Raises CaptionError (and
    CheckpointError / WeightsUnavailableError) with a one-line message when there is nothing to do."""
    validate(cfg)
    if not cfg.folder:
        raise CaptionError("no folder given: python -m captioner.caption FOLDER checkpoint=PATH")
    if not cfg.checkpoint:
        raise CaptionError("no checkpoint given: add checkpoint=PATH (a best.pt or last.pt written by training)")
    folder = Path(cfg.folder)
    if not folder.is_dir():
        raise CaptionError(f"folder not found: {folder}")
    paths, others = find_images(folder)
    if not paths:
        raise CaptionError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")

    start = time.perf_counter()
    captioner = Captioner.from_checkpoint(cfg.checkpoint, cfg.device)
    rel = [p.relative_to(folder).as_posix() for p in paths]

    def on_error(index: int, error: str) -> None:  # the loader's message repeats the path: say it once
        _warn(f"skipped {rel[index]}: {error.removeprefix(f'cannot read image {paths[index]}: ')}")

    attention = cfg.attention or (cfg.html and captioner.attends)  # (attention=true alone: refused if it cannot)
    results = captioner.caption_images(paths, cfg.decode, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                       progress=cfg.progress, on_error=on_error, attention=attention)

    captions, skipped, maps = [], [], {}
    for image_id, (name, result) in enumerate(zip(rel, results)):
        if "error" in result:
            skipped.append(name)
            continue
        entry = {"image_id": image_id, "file_name": name, "caption": result["caption"], "score": result["score"]}
        if "n_best" in result:
            entry["n_best"] = result["n_best"]
        captions.append(entry)
        if attention:
            maps[name] = (result["words"], result["attention"])
    if not captions:
        raise CaptionError(f"none of the {len(paths)} image files under {folder} could be read "
                           f"(first: {skipped[0]})")

    output = Path(cfg.output)
    atomic_write_text(output, json.dumps(captions, indent=1, ensure_ascii=False) + "\n")
    page, strips = None, None
    if cfg.html:
        from captioner.gallery import write_gallery

        good = [folder / c["file_name"] for c in captions]
        method = cfg.decode.method + (f", beam {cfg.decode.beam_size}" if cfg.decode.method == "beam" else "")
        attended = [{**c, "attention": maps[c["file_name"]]} for c in captions] if attention else captions
        page = write_gallery(output.with_suffix(".html"), attended, good, title=f"Captions: {folder.name or folder}",
                             subtitle=f"{len(captions)} images, checkpoint {cfg.checkpoint}, decode {method}",
                             skipped=skipped, size=cfg.thumbnail_size, view=captioner.view if attention else None)
    if cfg.attention:
        strips = write_strips(output.parent / f"{output.stem}_attention", folder, maps, captioner.view)
    return {"captions": captions, "skipped": skipped, "ignored": [p.relative_to(folder).as_posix() for p in others],
            "output": output, "html": page, "attention": strips, "seconds": time.perf_counter() - start}


def write_strips(directory: Path, folder: Path, maps: dict, view: Callable[[Image.Image], Image.Image]) -> Path:
    """One PNG per captioned image, its attention strip, named after its ``folder``-relative path
    ("/" as "__", then ".png": photo.jpg -> photo.jpg.png, so photo.jpg and photo.png stay apart)."""
    from captioner.attention import strip
    from captioner.images import BadImageError, load_image
    from captioner.io import atomic_path

    for name, (words, weights) in maps.items():
        try:
            image = strip(view(load_image(folder / name)), words, weights)
        except BadImageError:  # changed since it was captioned
            continue
        with atomic_path(directory / (name.replace("/", "__") + ".png")) as tmp:
            image.save(tmp, format="PNG")
    return directory


def _summary(summary: dict) -> str:
    written = ", ".join(str(p) for p in (summary["output"], summary["html"], summary["attention"]) if p)
    total = len(summary["captions"]) + len(summary["skipped"])
    lines = [f"captioned {len(summary['captions'])} of {total} images in {summary['seconds']:.1f}s -> {written}"]
    if summary["skipped"]:
        lines.append(f"skipped {len(summary['skipped'])} unreadable file(s):")
        lines += [f"  {name}" for name in summary["skipped"]]
    if summary["ignored"]:
        lines.append(f"ignored {len(summary['ignored'])} file(s) without an image extension")
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict:
    """The CLI's work: caption, print the summary."""
    summary = caption_folder(cfg)
    print(_summary(summary))
    return summary


def folder_argument(argv: Sequence[str]) -> list[str]:
    """Hydra takes only key=value overrides: the first bare argument is the folder."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg.startswith("-"):  # hydra's own flags (--help, --cfg job, ...) and their values
            break
        if "=" not in arg:
            if any(a.startswith("folder=") for a in argv):
                raise UsageError(f"two folders given: {arg!r} and folder=...; give one")
            quoted = arg.replace("\\", "\\\\").replace("'", "\\'")
            argv[i] = f"folder='{quoted}'"  # quoted: a path may hold spaces, commas or brackets
            break
    return argv


main = command("caption", run, argv_hook=folder_argument)

if __name__ == "__main__":
    main()
