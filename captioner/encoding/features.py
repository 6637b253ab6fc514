"""Image features: computed once per split and encoder, cached on disk, memory-mapped on reuse.

Files in the cache directory, per ``<encoder>_<split>`` (``<encoder>_grid_<split>`` for a grid):
  ``.npy``           the features [rows, D], or [rows, regions, D] for a grid (float16 by default),
                     memory-mapped when read
  ``.json``          its manifest: what was computed (encoder, weights fingerprint, transform, image
                     list hash, dtype, dim) and which unreadable images were skipped
  ``.partial.npy``   an extraction in progress, with ``.partial.json`` recording the rows done;
                     a rerun with the same manifest resumes from there, a different one discards it
A cache is reused only when its manifest matches what would be computed now.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from captioner.data import ImageRecord
from captioner.training.distributed import Dist
from captioner.data.images import BadImageError, load_image
from captioner.io import atomic_path, atomic_write_text

log = logging.getLogger("captioner.encoding.features")

FORMAT_VERSION = 1  # bump when the cache layout or the extraction changes, to rebuild old caches
SAVE_EVERY_S = 10.0  # how often an extraction records its progress for resuming


def default_workers() -> int:
    """DataLoader workers decoding images for the CNN when ``encoder.num_workers`` is null."""
    return min(8, (os.cpu_count() or 1) // 4)


def image_workers(encoder_cfg) -> int:
    return default_workers() if encoder_cfg.get("num_workers") is None else int(encoder_cfg.num_workers)


def extraction_options(encoder_cfg) -> dict:
    """The ``encoder`` config's extraction settings, as keywords of ``split_features`` and
    ``compute_features`` (.get: configs saved in checkpoints before precision and compile existed)."""
    return {"dtype": encoder_cfg.cache_dtype, "batch_size": encoder_cfg.batch_size,
            "num_workers": image_workers(encoder_cfg), "precision": encoder_cfg.get("precision", "fp32"),
            "compile": encoder_cfg.get("compile", True)}


def feature_cache_dir(data_cfg, encoder_cfg) -> Path:
    """``encoder.cache_dir``, or ``<data.root>/features``."""
    return Path(encoder_cfg.cache_dir or Path(data_cfg.root) / "features")


class ImageFiles(Dataset):
    """(index, uint8 image or None, error or None). A bad file yields a marker instead of raising,
    so a DataLoader worker never dies on it and every bad file of a pass gets reported."""

    def __init__(self, paths: Sequence[str], transform, start: int = 0):
        self.paths, self.transform, self.start = paths, transform, start

    def __len__(self) -> int:
        return len(self.paths) - self.start

    def __getitem__(self, i: int):
        index = self.start + i
        try:
            return index, self.transform(load_image(self.paths[index])), None
        except (BadImageError, Image.DecompressionBombError) as err:
            return index, None, str(err)


def collate(items):
    """-> (indices of the good images, their uint8 batch or None, [(index, error)] of the bad)."""
    good = [(i, x) for i, x, _ in items if x is not None]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, [(i, err) for i, x, err in items if x is None]


def encode_images(encoder, paths: Sequence[str], batch_size: int = 32, num_workers: int = 0,
                  device: str | torch.device = "cpu", start: int = 0, precision: str = "fp32",
                  compile: bool = False) -> Iterator[tuple]:
    """Encode ``paths[start:]`` in order: yields (indices, float32 features [b, D] on device or
    None, [(index, error)] of the unreadable images) per batch. Decoding runs in ``num_workers``
    DataLoader workers, overlapping with the CNN; the CNN runs as ``encoders.fast_forward`` makes
    it (channels_last, ``precision``, ``compile``)."""
    from captioner.encoding.encoders import fast_forward

    device = torch.device(device)
    # A private generator: the loader's worker seeds must not draw from (and shift) the global RNG.
    loader = DataLoader(ImageFiles(paths, encoder.crop, start), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=collate, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(0))
    was_training = encoder.training
    encoder.eval()  # extraction never uses dropout/BN batch statistics, frozen or not
    forward = fast_forward(encoder, device, batch_size, precision, compile)
    try:
        for indices, images, bad in loader:
            feats = None
            if images is not None:
                with torch.inference_mode():  # not around the yield: the mode would leak into the caller
                    feats = forward(images)
            yield indices, feats, bad
    finally:
        encoder.train(was_training)


# --- manifest ----------------------------------------------------------------------------

def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-1 of every parameter and buffer (names, dtypes, shapes and all bytes).

    Hashing everything is exact where a sample could miss e.g. a fine-tuned last layer, and it is
    cheap enough: ~1 GB/s, so 0.02 s for efficientnet_lite0 and ~0.5 s for VGG (553 MB), done
    once per run (``all_split_features`` shares it across splits)."""
    h = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy())  # raw bytes of any dtype, bf16 included
    return h.hexdigest()[:20]


def images_fingerprint(records: Sequence[ImageRecord]) -> str:
    return hashlib.sha1("\n".join(r.path for r in records).encode()).hexdigest()[:20]


def manifest_for(encoder, records: Sequence[ImageRecord], dtype: str, fingerprint: Optional[str] = None,
                 precision: str = "fp32") -> dict:
    """Everything the cached values depend on; a cache is reused only when this matches exactly.
    (A reduced ``precision`` is recorded; fp32, the only one before it existed, is implied, so
    older caches stay valid. Compilation and memory layout give the same features.)"""
    grid = {"regions": encoder.feature_shape[0]} if encoder.grid else {}
    reduced = {"precision": precision} if precision != "fp32" else {}
    return {
        "format": FORMAT_VERSION,
        "encoder": encoder.name,
        "weights": fingerprint or weights_fingerprint(encoder),
        "transform": encoder.transform_spec(),
        "num_images": len(records),
        "images_sha1": images_fingerprint(records),
        "dtype": dtype,
        "feature_dim": encoder.feature_dim,
        **grid,
        **reduced,
    }


# --- the cache ---------------------------------------------------------------------------

@dataclass
class SplitFeatures:
    """One split's features. Row i of ``features`` is ``records[i]``: in skip mode the unreadable
    images are dropped from both, so use these records, not the ones passed in."""

    features: np.ndarray  # [len(records), D] or [len(records), regions, D], read-only memory map
    records: list[ImageRecord]
    skipped: list[dict] = field(default_factory=list)  # {"index", "path", "error"} of dropped images
    computed: int = 0  # images encoded by this call (0 when the cache was reused)
    seconds: float = 0.0  # time spent encoding them

    @property
    def images_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds else 0.0


def _bad_images_error(split: str, skipped: list[dict], reused: bool) -> BadImageError:
    shown = "\n".join(f"  {s['error']}" for s in skipped[:20]) + (
        f"\n  ... and {len(skipped) - 20} more" if len(skipped) > 20 else "")
    kept = ("the cached features of the others are reused" if reused
            else "the features computed for the others are kept and reused")
    return BadImageError(
        f"{len(skipped)} unreadable image(s) in split {split!r}:\n{shown}\nRemove them from the data set "
        f"or set data.on_bad_image=skip to drop them ({kept}).")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One extraction per cache file at a time (parallel sweeps share a cache); others wait, then reuse."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def open_cache(path: str | Path, mode: str = "r") -> np.memmap:
    """Memory-map a cache array for random row access: no read-around, so a training batch reads
    (and maps) its rows, not 128 KB around each (5x less RSS and I/O from a cold cache)."""
    array = np.load(path, mmap_mode=mode)
    if hasattr(mmap, "MADV_RANDOM") and getattr(array, "_mmap", None) is not None:
        array._mmap.madvise(mmap.MADV_RANDOM)
    return array


def _open_array(path: Path, shape: tuple[int, ...], dtype: str, mode: str = "r") -> Optional[np.ndarray]:
    try:
        array = open_cache(path, mode)
    except (OSError, ValueError):
        return None
    return array if array.shape == shape and array.dtype == np.dtype(dtype) else None


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _describes(saved: Optional[dict], key: dict) -> bool:
    """Whether a saved manifest (the key plus rows, skipped, ...) is of the features ``key`` asks
    for; an absent precision is fp32 (``manifest_for``)."""
    return (saved is not None and {k: saved.get(k) for k in key} == key
            and saved.get("precision", "fp32") == key.get("precision", "fp32"))


def _pooled_from_grid(grid_stem: Path, key: dict, final: Path, manifest_path: Path):
    """The pooled cache written as the mean of a fresh grid cache's regions, for an encoder whose
    pooled vector is that mean (ResNet, Lite0): returns its skipped images; None without such a cache.
    The mean is taken in float32, as the pooled network takes it, then rounded to the cache's
    dtype (from float16 regions: within float16 rounding of a direct extraction)."""
    saved = _read_json(grid_stem.with_suffix(".json"))
    if not _describes(saved, key) or "regions" not in saved:
        return None
    rows = saved["num_images"] - len(saved.get("skipped", []))
    grid = _open_array(grid_stem.with_suffix(".npy"), (rows, saved["regions"], key["feature_dim"]), key["dtype"])
    if grid is None:
        return None
    manifest_path.unlink(missing_ok=True)
    with atomic_path(final) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=key["dtype"], shape=(rows, key["feature_dim"]))
        for s in range(0, rows, 1024):
            out[s : s + 1024] = grid[s : s + 1024].astype(np.float32).mean(axis=1)
        out.flush()
        del out
    skipped = saved.get("skipped", [])
    atomic_write_text(manifest_path, json.dumps({**key, "rows": rows, "skipped": skipped,
                                                 "derived_from": grid_stem.name + ".npy"}, indent=1))
    return skipped


def split_features(encoder, records: Sequence[ImageRecord], cache_dir: str | Path, split: str, *,
                   dtype: str = "float16", batch_size: int = 32, num_workers: int = 0,
                   device: str | torch.device = "cpu", progress: bool = True, on_bad_image: str = "error",
                   fingerprint: Optional[str] = None, precision: str = "fp32", compile: bool = False,
                   ctx: Optional[Dist] = None, read_only: bool = False) -> SplitFeatures:
    """Features for ``records``, memory-mapped from the cache; computed (or resumed) if stale.

    With ``ctx`` (the ranks of a torchrun job, sharing ``cache_dir``) every rank encodes its
    contiguous part of the images into the same array and rank 0 finishes the cache; each part
    resumes on its own after an interruption.

    Unreadable images are named in the log as they are found; ``on_bad_image="error"`` raises one
    BadImageError naming all of them after the pass (which is kept, so switching to ``skip`` costs
    no recomputation), ``"skip"`` drops them from ``.records`` and ``.features``.

    ``read_only``: a cache this process may not write (one a stranger's checkpoint names) is
    used when it holds these features; otherwise they are computed in memory, and nothing is
    written there."""
    records, ctx = list(records), ctx or Dist()
    if not records:
        raise ValueError(f"split {split!r} has no images")
    cache_dir = Path(cache_dir)
    stem = f"{encoder.cache_name}_{split}"
    final, manifest_path = cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"
    # an extraction in progress: the array (a row per image), the manifest it is for, and one
    # progress file per part of the images (one part per rank under torchrun)
    partial, partial_path = cache_dir / f"{stem}.partial.npy", cache_dir / f"{stem}.partial.json"
    key = manifest_for(encoder, records, dtype, fingerprint, precision)
    item_shape = encoder.feature_shape

    def finish(skipped: list[dict], features: np.ndarray, computed=0, seconds=0.0) -> SplitFeatures:
        if skipped and on_bad_image == "error":
            raise _bad_images_error(split, skipped, reused=not computed)
        if skipped:
            log.warning("split %s: skipped %d unreadable image(s) of %d (data.on_bad_image=skip; listed in %s)",
                        split, len(skipped), len(records), manifest_path)
        dropped = {s["index"] for s in skipped}
        kept = [r for i, r in enumerate(records) if i not in dropped]
        if not kept:
            raise BadImageError(f"split {split!r}: none of its {len(records)} images could be read "
                                f"(first: {skipped[0]['error']}); check data.root and the image paths")
        return SplitFeatures(features, kept, skipped, computed, seconds)

    shape = (len(records), *item_shape)

    def cached() -> Optional[list[dict]]:
        """The skipped images of a cache that holds what ``key`` asks for (found, or derived from
        the grid cache), or None."""
        saved = _read_json(manifest_path)
        if _describes(saved, key):
            if _open_array(final, (len(records) - len(saved.get("skipped", [])), *item_shape), dtype) is not None:
                return saved.get("skipped", [])
        if not encoder.grid and encoder.pooled_is_grid_mean and not read_only:
            derived = _pooled_from_grid(cache_dir / f"{encoder.cache_name}_grid_{split}", key, final, manifest_path)
            if derived is not None:
                log.info("split %s: %s pooled features = the mean of the cached grid's regions (no CNN pass)",
                         split, encoder.name)
                return derived
        return None

    def prepare_partial() -> None:
        """Keep the partial array of an interrupted extraction of ``key``, or start a fresh one."""
        if _read_json(partial_path) == key and _open_array(partial, shape, dtype, mode="r+") is not None:
            return
        for stale in cache_dir.glob(f"{stem}.partial.*-*.json"):
            stale.unlink()
        np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=shape).flush()
        atomic_write_text(partial_path, json.dumps(key))

    def finalize() -> list[dict]:
        """Rank 0, every part done: the partial array becomes the cache (without the unreadable
        images' rows), then its manifest. The old manifest goes first: a crash must never pair it
        with the new array."""
        parts = [ctx.part_of(rank, len(records)) for rank in range(ctx.world_size)]
        skipped = sorted((s for part in parts for s in _read_json(_progress_path(part))["skipped"]),
                         key=lambda s: s["index"])
        if skipped and on_bad_image == "error":  # fail before finalising, so skip mode can finish it
            raise _bad_images_error(split, skipped, reused=False)
        manifest_path.unlink(missing_ok=True)
        rows = len(records) - len(skipped)
        if not skipped:
            _fsync(partial)
            os.replace(partial, final)
        else:
            _copy_rows(partial, final, np.setdiff1d(np.arange(len(records)), [s["index"] for s in skipped]))
        atomic_write_text(manifest_path, json.dumps({**key, "rows": rows, "skipped": skipped}, indent=1))
        for part in parts:
            _progress_path(part).unlink(missing_ok=True)
        partial_path.unlink(missing_ok=True)
        return skipped

    def _progress_path(part: range) -> Path:
        return cache_dir / f"{stem}.partial.{part.start}-{part.stop}.json"

    if read_only:
        skipped = cached()
        if skipped is not None:
            return finish(skipped, open_cache(final))
        log.info("split %s: %s features computed in memory, not cached: %s is named by the checkpoint, which is "
                 "only read", split, encoder.name, cache_dir)
        return finish(*_uncached(encoder, records, dtype, batch_size=batch_size, num_workers=num_workers,
                                 device=device, precision=precision, compile=compile))
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Rank 0 holds the cache's lock throughout; the other ranks of its job follow its decisions.
    with _locked(cache_dir / f".{stem}.lock") if ctx.is_main else contextlib.nullcontext():
        skipped = ctx.on_main(cached)
        if skipped is not None:
            return finish(skipped, open_cache(final))
        ctx.on_main(prepare_partial)
        computed, seconds = _encode_part(encoder, records, split, partial, shape, dtype, key,
                                         _progress_path(ctx.part(len(records))), ctx.part(len(records)),
                                         batch_size=batch_size, num_workers=num_workers, device=device,
                                         progress=progress and ctx.is_main, precision=precision, compile=compile)
        ctx.barrier()
        skipped = ctx.on_main(finalize)
        computed, seconds = sum(ctx.gather(computed)), max(ctx.gather(seconds))
        return finish(skipped, open_cache(final), computed, seconds)


def _encode_part(encoder, records, split: str, partial: Path, shape: tuple, dtype: str, key: dict,
                 progress_path: Path, part: range, *, batch_size: int, num_workers: int, device, progress: bool,
                 precision: str, compile: bool) -> tuple[int, float]:
    """Encode the images ``part`` into their rows of the partial array, resuming from this part's
    progress file (the rows done and the unreadable images found). Returns (images encoded
    now, seconds)."""
    out = _open_array(partial, shape, dtype, mode="r+")
    state = _read_json(progress_path)
    if state is None or state.get("manifest") != key:
        state = {"manifest": key, "done": part.start, "skipped": []}
    elif state["done"] > part.start:
        log.info("split %s: resuming %s features at image %d of %d", split, encoder.name, state["done"], len(records))

    def save_progress() -> None:
        out.flush()  # rows on disk before the progress file claims them
        atomic_write_text(progress_path, json.dumps(state))

    first, last_save, start = state["done"], time.monotonic(), time.perf_counter()
    if state["done"] < part.stop:
        from tqdm import tqdm

        paths = [r.path for r in records[: part.stop]]
        try:
            with tqdm(total=len(part), initial=state["done"] - part.start, desc=f"{split} features ({encoder.name})",
                      unit="img", disable=not progress) as bar:
                for indices, feats, bad in encode_images(encoder, paths, batch_size, num_workers, device,
                                                         start=state["done"], precision=precision, compile=compile):
                    for index, error in bad:
                        log.warning("unreadable image: %s", error)
                        state["skipped"].append({"index": index, "path": records[index].path, "error": error})
                    if feats is not None:
                        out[indices] = feats.to("cpu", getattr(torch, dtype)).numpy()
                    state["done"] += len(indices) + len(bad)
                    bar.update(len(indices) + len(bad))  # tqdm shows images/s
                    if time.monotonic() - last_save > SAVE_EVERY_S:
                        save_progress()
                        last_save = time.monotonic()
        finally:  # an interrupted run (error, Ctrl-C) keeps every finished batch for the rerun
            save_progress()
    else:
        save_progress()
    return state["done"] - first, time.perf_counter() - start


def all_split_features(encoder, records: dict[str, Sequence[ImageRecord]], cache_dir: str | Path,
                       **kwargs) -> dict[str, SplitFeatures]:
    """``split_features`` for every non-empty split, hashing the weights once."""
    fingerprint = weights_fingerprint(encoder)
    return {split: split_features(encoder, recs, cache_dir, split, fingerprint=fingerprint, **kwargs)
            for split, recs in records.items() if recs}


def compute_features(encoder, records: Sequence[ImageRecord], *, dtype: str = "float16", batch_size: int = 32,
                     num_workers: int = 0, device: str | torch.device = "cpu", precision: str = "fp32",
                     compile: bool = False) -> np.ndarray:
    """Features [len(records), *encoder.feature_shape] computed now, in memory, not cached: for an
    encoder whose weights change (fine-tuning) or were fine-tuned (a checkpoint's own encoder),
    which a cache keyed by the original weights does not describe. Rounded to ``dtype`` as the
    cache is, so decoding them gives the captions ``Captioner`` gives; any unreadable image is an
    error."""
    out, bad = _encode_in_memory(encoder, records, dtype, batch_size=batch_size, num_workers=num_workers,
                                 device=device, precision=precision, compile=compile)
    if bad:
        raise BadImageError(bad[0][1])
    return out


def _copy_rows(partial: Path, final: Path, keep: np.ndarray) -> None:
    """Write the rows ``keep`` of the array ``partial`` (those of the readable images) as the
    array ``final``, atomically, a slice at a time, then remove ``partial``."""
    out = open_cache(partial)
    with atomic_path(final) as tmp:
        dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=out.dtype, shape=(len(keep), *out.shape[1:]))
        for s in range(0, len(keep), 1 << 14):
            dst[s : s + (1 << 14)] = out[keep[s : s + (1 << 14)]]
        dst.flush()
        del dst
    del out
    partial.unlink()


def _uncached(encoder, records: Sequence[ImageRecord], dtype: str, **options) -> tuple[list[dict], np.ndarray, int, float]:
    """(the unreadable images, the features of the others, images encoded, seconds): a split's
    features computed in memory, as the cache would hold them."""
    start = time.perf_counter()
    features, bad = _encode_in_memory(encoder, records, dtype, **options)
    skipped = [{"index": i, "path": records[i].path, "error": error} for i, error in bad]
    for s in skipped:
        log.warning("unreadable image: %s", s["error"])
    kept = np.setdiff1d(np.arange(len(records)), [s["index"] for s in skipped])
    return skipped, features[kept], len(records), time.perf_counter() - start


def _encode_in_memory(encoder, records: Sequence[ImageRecord], dtype: str, **options) -> tuple[np.ndarray, list]:
    """(float32 features rounded to ``dtype``, zero rows for the unreadable images; [(index, error)]
    of those)."""
    out = np.zeros((len(records), *encoder.feature_shape), dtype=np.float32)
    unreadable = []
    for indices, feats, bad in encode_images(encoder, [r.path for r in records], **options):
        unreadable += bad
        if feats is not None:
            out[indices] = feats.to(getattr(torch, dtype)).float().cpu().numpy()
    return out, unreadable
