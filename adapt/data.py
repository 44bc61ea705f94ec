"""Labelled image folders for the accuracy harness (and `tune`): one subfolder per class, seeded subsets."""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from adaptclip.adapt.images import to_rgb
from adaptclip.adapt.shifts import Shift

# File suffixes that folder walks (labelling jobs, evaluation, real-image calibration) treat as images.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"})


@dataclass(frozen=True)
class Dataset:
    """Images of a folder with one subfolder per class; labels index `classes`."""

    name: str
    classes: tuple[str, ...]
    paths: tuple[Path, ...]
    labels: tuple[int, ...]


def load_folder(root: str | Path, classes: Sequence[str] | None = None, limit_per_class: int | None = None,
                seed: int = 0) -> Dataset:
    """Class subfolders of `root` (sorted names, or `classes` in that label order). With
    `limit_per_class`, a seeded random subset of each class, the same for every method and shift."""
    root = Path(root)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    names = tuple(classes) if classes else tuple(folders)
    if not names:
        raise ValueError(f"no class subfolders under {root}")
    missing = [c for c in names if c not in folders]
    if missing:
        raise ValueError(f"class folder(s) missing under {root}: {', '.join(missing[:5])}")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if limit_per_class is not None and len(files) > limit_per_class:
            files = sorted(random.Random(f"{seed}:{name}").sample(files, limit_per_class))
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise ValueError(f"no images under {root}")
    return Dataset(root.name, names, tuple(paths), tuple(labels))


def decode_shifted(path: Path, shift: Shift, seed: int) -> Image.Image:
    """Decode as the server does (PIL, RGB), corrupt, and store as 8-bit RGB (as a corrupted file would be)."""
    img = to_rgb(Image.open(path))
    if shift.name == "clean":
        return img
    out = shift(TF.to_tensor(img), seed)
    return Image.fromarray((out * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
