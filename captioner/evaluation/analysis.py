"""The error-analysis page of an evaluation (``python -m captioner.evaluate ... html=true``).

One self-contained HTML file (thumbnails as data URIs, inline style and script): the corpus
scores on top, then every image with its caption, its references and its own CIDEr-D and BLEU-4
(``metrics.image_scores``, the toolkit's arithmetic), worst CIDEr-D first; a filter box keeps the
images whose caption or references contain every word typed. For an attention decoder each image
also shows its attention strip (``captioner.evaluation.attention.strip``).
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from PIL import Image

from captioner.evaluation.gallery import thumbnail_data_uri
from captioner.data.images import BadImageError, load_image
from captioner.io import atomic_write_text

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; background: #f6f6f6; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .3em; }
.scores { margin: 0 0 1em; } .scores span { margin-right: 1.2em; }
#filter { width: 28em; padding: 4px; margin-bottom: 1em; }
.item { display: flex; gap: 12px; background: #fff; border: 1px solid #ddd; border-radius: 4px; padding: 8px;
        margin-bottom: 10px; }
.item .text { flex: 1; }
.caption { font-size: 1.05em; }
.figures { color: #555; font-size: .85em; margin: 2px 0 4px; }
.refs { color: #555; font-size: .88em; margin: 0; padding-left: 1.4em; }
.strip { display: block; margin-top: 6px; max-width: 100%; }
"""

_SCRIPT = """
const box = document.getElementById('filter');
box.addEventListener('input', () => {
  const words = box.value.toLowerCase().split(/\\s+/).filter(Boolean);
  let shown = 0;
  for (const item of document.querySelectorAll('.item')) {
    const text = item.dataset.text;
    const keep = words.every(w => text.includes(w));
    item.style.display = keep ? '' : 'none';
    shown += keep;
  }
  document.getElementById('shown').textContent = shown;
});
"""


def render_page(items: Sequence[dict], corpus: Mapping[str, object], title: str) -> str:
    """``items``: dicts with thumbnail, width, height, caption, references, CIDEr, Bleu_4,
    image_id and optionally strip (a data URI), in the order shown."""
    esc = html.escape
    scores = "".join(f"<span>{esc(k)} <b>{v:.3f}</b></span>" for k, v in corpus.items() if isinstance(v, float))
    rows = []
    for item in items:
        text = " ".join([item["caption"], *item["references"]]).lower()
        refs = "".join(f"<li>{esc(r)}</li>" for r in item["references"])
        strip = f'<img class="strip" src="{item["strip"]}" alt="attention">' if item.get("strip") else ""
        rows.append(
            f'<div class="item" data-text="{esc(text)}"><img src="{item["thumbnail"]}" width="{item["width"]}" '
            f'height="{item["height"]}" alt="{esc(str(item["image_id"]))}"><div class="text">'
            f'<div class="caption">{esc(item["caption"])}</div>'
            f'<div class="figures">CIDEr-D {item["CIDEr"]:.3f} · BLEU-4 {item["Bleu_4"]:.3f} · '
            f'{esc(str(item["image_id"]))}</div><ol class="refs">{refs}</ol>{strip}</div></div>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{_STYLE}</style></head>\n<body><h1>{esc(title)}</h1>"
            f"<div class=\"scores\">{scores}</div>"
            f"<input id=\"filter\" placeholder=\"filter: words in the caption or the references\"> "
            f"<span id=\"shown\">{len(items)}</span> of {len(items)} images, worst CIDEr-D first\n"
            + "\n".join(rows) + f"\n<script>{_SCRIPT}</script>\n</body></html>\n")


def write_error_page(path: str | Path, results: Sequence[dict], records: Sequence, per_image: Mapping,
                     corpus: Mapping[str, object], title: str, size: int = 160,
                     view: Optional[Callable[[Image.Image], Image.Image]] = None) -> Path:
    """Write the page for ``results`` ({"image_id", "caption", and for an attention decoder
    "words" and "attention"}) of ``records``, with ``per_image`` scores by image id,
    atomically. An image that cannot be read again shows without its thumbnail."""
    from captioner.evaluation.attention import strip

    # by image id, not by position: nothing then ties a caption to another image's references
    # and thumbnail if the results come in another order than the records
    record_of = {record.image_id: record for record in records}
    items = []
    for result in results:
        record, scores = record_of[result["image_id"]], per_image[result["image_id"]]
        item = {"image_id": result["image_id"], "caption": result["caption"], "references": list(record.captions),
                **scores, "thumbnail": "", "width": size, "height": size}
        try:
            image = load_image(record.path)
        except BadImageError:
            image = None
        if image is not None:
            item["thumbnail"], item["width"], item["height"] = thumbnail_data_uri(image, size, quality=80)
            if result.get("attention") is not None and view is not None:
                picture = strip(view(image), result["words"], result["attention"], 64)
                item["strip"] = thumbnail_data_uri(picture, max(picture.size), quality=80)[0]
        items.append(item)
    items.sort(key=lambda item: (item["CIDEr"], item["Bleu_4"]))
    atomic_write_text(path, render_page(items, corpus, title))
    return Path(path)
