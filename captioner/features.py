"""Image features: computed once per split and encoder, cached on disk, memory-mapped on reuse.

A cache is reused only when its manifest (encoder, weights fingerprint, transform, image list)
matches what would be computed now; otherwise it is recomputed.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from captioner.datasets import ImageRecord
from captioner.images import load_image
from captioner.io import atomic_path, atomic_write_text


class ImageDataset(Dataset):
    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[i]))


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of the parameters, so changed weights invalidate the cache."""
    h = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()[:4096])
        h.update(str(float(tensor.float().sum())).encode())
    return h.hexdigest()[:16]


def manifest_for(encoder, records: list[ImageRecord], dtype: str) -> dict:
    paths = "\n".join(r.path for r in records)
    return {
        "encoder": encoder.name,
        "weights": weights_fingerprint(encoder),
        "transform": encoder.transform_spec(),
        "num_images": len(records),
        "images_sha1": hashlib.sha1(paths.encode()).hexdigest(),
        "dtype": dtype,
        "feature_dim": encoder.feature_dim,
    }


@torch.inference_mode()
def extract(encoder, paths: list[str], out: np.ndarray, batch_size: int = 32, num_workers: int = 0,
            device: str | torch.device = "cpu", progress: bool = True) -> None:
    from tqdm import tqdm

    loader = DataLoader(ImageDataset(paths, encoder.transform), batch_size=batch_size, num_workers=num_workers)
    encoder = encoder.to(device).eval()
    start, row = time.perf_counter(), 0
    with tqdm(total=len(paths), desc=f"features {encoder.name}", unit="img", disable=not progress) as bar:
        for images in loader:
            feats = encoder(images.to(device)).float().cpu().numpy()
            out[row : row + len(feats)] = feats
            row += len(feats)
            bar.update(len(feats))
            bar.set_postfix(img_per_s=f"{row / (time.perf_counter() - start):.1f}")


def cached_features(encoder, records: list[ImageRecord], cache_dir: str | Path, split: str,
                    dtype: str = "float16", batch_size: int = 32, num_workers: int = 0,
                    device: str | torch.device = "cpu", progress: bool = True) -> np.ndarray:
    """Features [N, D] for ``records``, memory-mapped from the cache (computed if stale)."""
    cache_dir = Path(cache_dir)
    array_path = cache_dir / f"{encoder.name}_{split}.npy"
    manifest_path = array_path.with_suffix(".json")
    manifest = manifest_for(encoder, records, dtype)
    if array_path.exists() and manifest_path.exists() and json.loads(manifest_path.read_text()) == manifest:
        return np.load(array_path, mmap_mode="r")
    with atomic_path(array_path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(records), encoder.feature_dim))
        extract(encoder, [r.path for r in records], out, batch_size, num_workers, device, progress)
        out.flush()
        del out
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    return np.load(array_path, mmap_mode="r")
