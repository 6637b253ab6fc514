"""An uploaded photo, checked against what one request may cost the server before any pixel is
decoded (its file size, its pixel count and its shape, read from the header), then read by the one
image loader (``captioner.data.images.load_image``). A refusal is a ``RequestError`` whose message
is for the page: it names the file as the visitor named it, never the path the server stored it at."""
from __future__ import annotations

import os

from PIL import Image

from captioner.data.images import BadImageError, load_image


class RequestError(ValueError):
    """A request the demo does not caption; the message says why, to the visitor."""


def read_upload(path: str, name: str, limits) -> Image.Image:
    """The photo stored at ``path`` (uploaded as ``name``) as RGB, within ``limits`` (the ``demo``
    config: max_upload_mb, max_megapixels, max_aspect_ratio), or RequestError."""
    try:
        megabytes = os.path.getsize(path) / 2**20
    except OSError as err:
        raise RequestError(f"{name} cannot be read ({err.strerror}): upload it again") from None
    if megabytes > limits.max_upload_mb:
        raise RequestError(f"{name} is {megabytes:.1f} MB: this demo takes photos of at most "
                           f"{limits.max_upload_mb:g} MB")
    try:
        with Image.open(path) as header:  # lazy: only the header is read
            width, height = header.size
    except Image.DecompressionBombError as err:
        raise RequestError(f"{name} is refused: {err}") from None
    except (OSError, ValueError, SyntaxError):
        width = height = None  # not an image PIL can open: load_image below words it
    if width is not None:
        if width * height > limits.max_megapixels * 1e6:
            raise RequestError(f"{name} is {width} x {height} pixels: this demo reads at most "
                               f"{limits.max_megapixels:g} megapixels; send a smaller copy")
        if max(width, height) > limits.max_aspect_ratio * max(min(width, height), 1):
            raise RequestError(f"{name} is {width} x {height} pixels: one side may be at most "
                               f"{limits.max_aspect_ratio:g} times the other; crop it")
    try:
        return load_image(path)
    except BadImageError as err:
        raise RequestError(str(err).replace(str(path), name)) from None
