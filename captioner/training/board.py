"""TensorBoard logging of a training run (``train.tensorboard``), under ``<run>/tensorboard``.

Every step: the loss, the learning rate and the objective's figures (SCST: its reward, baseline,
sample length). Every epoch: each validation metric, the epoch's mean loss and figures, and the
first validation images' captions beside their references, as text. ``train.tensorboard`` null
(the default) logs when the ``tensorboard`` package is installed and says in one line that it
does not otherwise; true requires it. A resumed run drops the events past its checkpoint's step
(``purge_step``), so a run killed after its last save shows each step once. Only rank 0 writes.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

from captioner.io import markdown_text

log = logging.getLogger("captioner.training.board")

CAPTIONS_SHOWN = 5  # validation images whose captions are logged each epoch


class Board:
    """A SummaryWriter, or nothing (every method a no-op)."""

    def __init__(self, writer=None):
        self.writer = writer

    @staticmethod
    def writer_class(setting: Optional[bool]):
        """SummaryWriter, or None when ``train.tensorboard`` is false or (null) the package is
        missing; true without the package is an error (checked at start-up, before any data work)."""
        if setting is False:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if setting:
                raise ValueError("train.tensorboard=true needs the tensorboard package: pip install tensorboard "
                                 "(or the project's [tensorboard] extra), or set train.tensorboard=false") from None
            return None
        return SummaryWriter

    @classmethod
    def open(cls, setting: Optional[bool], out_dir: Path, resumed_step: Optional[int] = None) -> "Board":
        writer = cls.writer_class(setting)
        if writer is None:
            if setting is None:
                log.info("TensorBoard logging off: the tensorboard package is not installed (pip install tensorboard)")
            return cls()
        return cls(writer(log_dir=str(out_dir / "tensorboard"), purge_step=resumed_step))

    def step(self, step: int, loss: float, lr: float, figures: dict[str, float]) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar("train/step_loss", loss, step)
        self.writer.add_scalar("lr", lr, step)
        for name, value in figures.items():
            self.writer.add_scalar(f"train/step_{name}", value, step)

    def epoch(self, step: int, row: dict, results: Sequence[dict], records: Sequence) -> None:
        """The epoch's metrics.jsonl row (its train/ and val/ numbers) and the first validation
        captions, each under its references."""
        if self.writer is None:
            return
        for name, value in row.items():
            if name.startswith(("train/", "val/")) and isinstance(value, (int, float)):
                self.writer.add_scalar(name, value, step)
        references = {r.image_id: r.captions for r in records}
        lines = []
        for result in results[:CAPTIONS_SHOWN]:
            # (TensorBoard renders Markdown: captions and references are shown, never run as HTML)
            shown = "  \n".join(f"- {markdown_text(c)}" for c in references.get(result["image_id"], [])[:3])
            lines.append(f"**{markdown_text(result['image_id'])}**: {markdown_text(result['caption'])}  \n{shown}")
        self.writer.add_text("val/captions", "\n\n".join(lines), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
