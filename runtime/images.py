"""Folders of images, optionally labelled by a `labels.csv` (columns `file,label`)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crossvit.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LABELS_FILE = "labels.csv"


@dataclass
class ImageSet:
    root: Path
    files: list[Path]
    labels: list[str] | None  # class names, aligned with files, when labels.csv exists

    def __len__(self) -> int:
        return len(self.files)


def list_images(folder: str | Path) -> ImageSet:
    """The images of a folder (sorted), with labels when it has a labels.csv."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder of images" if root.exists() else f"{root}: no such folder")
    table = root / LABELS_FILE
    if table.is_file():
        try:
            with open(table, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise InputError(f"{table}: not a readable labels file ({e})") from None
        if not rows or not {"file", "label"} <= set(rows[0]):
            raise InputError(f"{table}: expected a header `file,label` and one row per image")
        files = [root / r["file"] for r in rows]
        missing = [str(p.name) for p in files if not p.is_file()]
        if missing:
            raise InputError(f"{table}: {len(missing)} listed files are missing ({', '.join(missing[:3])})")
        return ImageSet(root, files, [r["label"] for r in rows])
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{root}: contains no images ({', '.join(IMAGE_SUFFIXES)})")
    return ImageSet(root, files, None)


def load_image_set(images: ImageSet, preprocessor) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Decode and preprocess every image: (batch, indices of the good ones, [(file, error)])."""
    from .preprocess import preprocess_files

    array, good, errors = preprocess_files(images.files, preprocessor)
    if not len(good):
        raise InputError(f"{images.root}: none of its {len(images)} images could be read "
                         f"({errors[0][1] if errors else 'empty'})")
    position = {id(p): i for i, p in enumerate(images.files)}
    return array, [position[id(p)] for p in good], [(str(p), e) for p, e in errors]
