"""One safe image loader for every path into the model (training, extraction, captioning)."""
from __future__ import annotations

import os

from PIL import Image, ImageOps


class BadImageError(ValueError):
    """An image file that cannot be decoded; the message names the file."""


def inside(folder: str | os.PathLike, name: str, source: str) -> str:
    """The path of image ``name`` (as a data set's file names it) in ``folder``, which it must
    stay inside: an absolute name, or one that climbs out with "..", is one ValueError naming
    ``source`` (the file that gave the name) rather than a read of a file elsewhere."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{source}: an image file name is {name!r}, not a file name")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.isabs(name) or os.path.commonpath([root, path]) != root:
        raise ValueError(f"{source}: image {name!r} is outside its image folder {folder}: file names must be "
                         "relative to data.image_dir and stay inside it")
    return os.path.join(folder, name)


def load_image(path: str | os.PathLike | Image.Image) -> Image.Image:
    """Open any image as RGB with its EXIF orientation applied.

    ``path`` may also be an already-open PIL image (a caller's in-memory picture), which gets the
    same treatment, so every input to the model goes through this one function."""
    if isinstance(path, Image.Image):
        try:
            return to_rgb(ImageOps.exif_transpose(path))  # never modifies the caller's image
        except (OSError, ValueError, SyntaxError) as err:
            raise BadImageError(f"cannot read image {describe(path)}: {err}") from None
    try:
        with Image.open(path) as image:
            image.seek(0)  # first frame of animations
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three for bad files
        raise BadImageError(f"cannot read image {path}: {err}") from None


def describe(image: Image.Image) -> str:
    """A name for an in-memory image in messages: its file name when it was opened from one."""
    name = getattr(image, "filename", "") or ""
    return str(name) if name else f"<{image.mode} image {image.width}x{image.height}>"


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        image.load()
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")  # composite transparency onto white, as a viewer shows it
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
