"""Caption a folder of images with a trained checkpoint.

    python -m captioner.caption FOLDER checkpoint=PATH [decode=beam decode.beam_size=5 ...]
                                [html=true] [attention=true] [output=captions.json]

Finds images under FOLDER recursively, captions them in batches and writes ``captions.json``
(the COCO results format, ``[{"image_id", "caption"}]``, plus ``file_name`` relative to FOLDER,
``score``, and ``n_best`` when ``decode.n_best > 1``); ``html=true`` also writes a self-contained
gallery page beside it, which for an attention decoder shows each word of a caption with where
the model looked (``captioner.evaluation.attention``); ``attention=true`` writes the same strip as one PNG
per image into ``<output stem>_attention/``. Unreadable files are skipped with one warning line
each and listed at the end; a run with nothing to caption exits non-zero with one line.

From Python, the same path: ``captioner.Captioner`` (``captioner.decoding.captioner``).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from captioner.cli import UsageError, command
from captioner.config import validate
from captioner.data.images import BadImageError, load_image
from captioner.decoding.captioner import CaptionError, Captioner
from captioner.evaluation.attention import strip
from captioner.evaluation.gallery import write_gallery
from captioner.io import atomic_path, atomic_write_text

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# -- the command line --------------------------------------------------------------------------
def find_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """(files with an image extension, other files) under ``folder``, recursively, sorted."""
    images, others = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        (images if path.suffix.lower() in IMAGE_EXTENSIONS else others).append(path)
    return images, others


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a byte the file system's decoding could not map (a lone surrogate)
        return False


def printable(name: str) -> str:
    """``name`` with the bytes that are not UTF-8 shown as escapes (caf\\xe9.jpg)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _warn(message: str) -> None:
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
    # A name that is not valid UTF-8 (bytes from another system's encoding) cannot go into the
    # JSON and HTML outputs: such a file is skipped and named, the rest are captioned.
    unnamed = [p for p in paths if not _utf8(p.relative_to(folder).as_posix())]
    for path in unnamed:
        _warn(f"skipped {printable(path.relative_to(folder).as_posix())}: its name is not valid UTF-8; rename it")
    paths = [p for p in paths if p not in unnamed]
    if not paths:
        raise CaptionError(f"no image file under {folder} has a UTF-8 name (first: {printable(str(unnamed[0]))})")

    start = time.perf_counter()
    captioner = Captioner.from_checkpoint(cfg.checkpoint, cfg.device)
    rel = [p.relative_to(folder).as_posix() for p in paths]

    def on_error(index: int, error: str) -> None:  # the loader's message repeats the path: say it once
        _warn(f"skipped {rel[index]}: {error.removeprefix(f'cannot read image {paths[index]}: ')}")

    attention = cfg.attention or (cfg.html and captioner.attends)  # (attention=true alone: refused if it cannot)
    results = captioner.caption_images(paths, cfg.decode, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                       progress=cfg.progress, on_error=on_error, attention=attention)

    captions, skipped, maps = [], [printable(p.relative_to(folder).as_posix()) for p in unnamed], {}
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
