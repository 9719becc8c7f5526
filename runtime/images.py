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
    parts = list(iter_image_set(images, preprocessor, chunk=max(len(images), 1)))
    return (np.concatenate([a for a, _, _ in parts]), [i for _, kept, _ in parts for i in kept],
            [e for _, _, errors in parts for e in errors])


def iter_image_set(images: ImageSet, preprocessor, chunk: int = 256):
    """`load_image_set` in pieces of `chunk` files, so a large folder is never one array:
    yields (batch, indices of its good images in the whole set, [(file, error)]) for each piece
    with at least one good image; InputError when no image at all could be read."""
    from .preprocess import preprocess_files

    any_good, first_error = False, None
    for start in range(0, len(images), chunk):
        files = images.files[start:start + chunk]
        array, good, errors = preprocess_files(files, preprocessor)
        first_error = first_error or (errors[0][1] if errors else None)
        position = {id(p): start + i for i, p in enumerate(files)}
        errors = [(str(p), e) for p, e in errors]
        if len(good):
            any_good = True
            yield array, [position[id(p)] for p in good], errors
        elif errors:
            yield np.zeros((0, *preprocessor.input_size), np.float32), [], errors
    if not any_good:
        raise InputError(f"{images.root}: none of its {len(images)} images could be read "
                         f"({first_error or 'empty'})")
