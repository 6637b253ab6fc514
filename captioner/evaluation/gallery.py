"""A self-contained HTML page of thumbnails and their captions (like NeuralTalk2's viewer); for an
attention decoder, under each caption its words, each over the image lit where the model looked.

Thumbnails are embedded as base64 JPEG data URIs and the style is inline, so the one file opens
offline, can be mailed or attached to a report, and never points at images that moved.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Callable, Optional, Sequence

from PIL import Image

from captioner.data.images import BadImageError, load_image
from captioner.io import atomic_write_text

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; background: #f6f6f6; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .2em; }
.meta { color: #666; margin: 0 0 1.2em; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; width: %(width)dpx; background: #fff; border: 1px solid #ddd; border-radius: 4px; padding: 8px; }
figure img { display: block; margin: 0 auto 6px; max-width: 100%%; height: auto; }
figcaption .caption { font-size: 1.05em; }
figcaption .file { color: #888; font-size: .8em; word-break: break-all; margin-top: 4px; }
figcaption ol { color: #555; font-size: .85em; margin: 6px 0 0; padding-left: 1.4em; }
.words { display: flex; flex-wrap: wrap; gap: 4px; margin-top: 6px; }
.words figure { width: auto; padding: 0; border: 0; font-size: .8em; text-align: center; }
.skipped { margin-top: 2em; color: #a33; }
"""


def thumbnail_data_uri(image: Image.Image, size: int = 256, quality: int = 85) -> tuple[str, int, int]:
    """(data URI of a JPEG at most ``size`` pixels on its longer side, width, height)."""
    thumb = image.convert("RGB")
    thumb.thumbnail((size, size))
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), thumb.width, thumb.height


def word_tiles(view: Image.Image, words: Sequence[str], maps, size: int = 64) -> list[dict]:
    """[{"word", "thumbnail"}]: each word's attention tile (``captioner.evaluation.attention.tile``) as a data URI."""
    from captioner.evaluation.attention import tile

    return [{"word": word, "thumbnail": thumbnail_data_uri(tile(view, weights, size), size)[0]}
            for word, weights in zip(words, maps)]


def render_gallery(items: Sequence[dict], title: str = "Captions", subtitle: str = "",
                   skipped: Sequence[str] = (), size: int = 256) -> str:
    """The page for ``items``: dicts with ``thumbnail`` (a data URI), ``width``, ``height``,
    ``caption`` and optionally ``file_name``, ``score``, ``n_best`` ([{"caption", "score"}]) and
    ``words`` (``word_tiles``)."""
    esc = html.escape
    figures = []
    for item in items:
        details = [esc(item["file_name"])] if item.get("file_name") else []
        if item.get("score") is not None:
            details.append(f"score {item['score']:.3f}")
        n_best = "".join(f"<li>{esc(c['caption'])} <small>({c['score']:.3f})</small></li>"
                         for c in item.get("n_best") or [])
        words = "".join(f'<figure><img src="{w["thumbnail"]}" alt="{esc(w["word"])}"><div>{esc(w["word"])}</div>'
                        "</figure>" for w in item.get("words") or [])
        figures.append(
            f'<figure><img src="{item["thumbnail"]}" width="{item["width"]}" height="{item["height"]}" '
            f'alt="{esc(item["caption"])}">'
            f'<figcaption><div class="caption">{esc(item["caption"])}</div>'
            f'<div class="file">{" · ".join(details)}</div>'
            + (f"<ol>{n_best}</ol>" if n_best else "") + (f'<div class="words">{words}</div>' if words else "")
            + "</figcaption></figure>"
        )
    skipped_html = ""
    if skipped:
        names = "".join(f"<li>{esc(name)}</li>" for name in skipped)
        skipped_html = f'<div class="skipped">Skipped {len(skipped)} unreadable file(s):<ul>{names}</ul></div>'
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
        f"<style>{_STYLE % {'width': size + 18}}</style></head>\n<body><h1>{esc(title)}</h1>"
        f"<p class=\"meta\">{esc(subtitle)}</p>\n<div class=\"grid\">\n" + "\n".join(figures) + "\n</div>"
        f"{skipped_html}\n</body></html>\n"
    )


def write_gallery(path: str | Path, results: Sequence[dict], images: Sequence, title: str = "Captions",
                  subtitle: str = "", skipped: Sequence[str] = (), size: int = 256,
                  view: Optional[Callable[[Image.Image], Image.Image]] = None) -> Optional[Path]:
    """Write the page for ``results`` (caption dicts) of ``images`` (paths or PIL images, same
    order), atomically. An image that cannot be read again is left out. A result with
    "attention" ((words, maps)) gets its word tiles over ``view(image)``, the crop the encoder read."""
    items = []
    for result, image in zip(results, images):
        try:
            image = load_image(image)  # EXIF-rotated, RGB
        except BadImageError:  # e.g. deleted or overwritten since it was captioned
            continue
        uri, width, height = thumbnail_data_uri(image, size)
        item = {k: v for k, v in result.items() if k != "attention"}
        if result.get("attention") is not None:
            item["words"] = word_tiles(view(image), *result["attention"])
        items.append({**item, "thumbnail": uri, "width": width, "height": height})
    atomic_write_text(path, render_gallery(items, title, subtitle, skipped, size))
    return Path(path)
