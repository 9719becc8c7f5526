"""Calibration images for the int8/fp8 (and AutoCast fp16/bf16) variants."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crossvit.assets import heldout_images
from crossvit.contract import MAX_CALIBRATION_IMAGES, MIN_CALIBRATION_IMAGES
from crossvit.errors import ExportError, InputError
from crossvit.runtime.images import list_images


def calibration_batch(metadata: dict, folder: str | Path | None, *, need: bool = True) -> np.ndarray | None:
    """Preprocessed float32 images (N, C, H, W) for calibration, like the model's inputs.

    `folder=None` uses the shipped held-out images, but only for the embedded model they
    belong to. Every file must decode: a bad calibration image is an error, not a skip.
    """
    from crossvit.model import DEFAULT_MODEL
    from crossvit.runtime.preprocess import Preprocessor

    model = metadata["model"]
    if folder is None:
        if model.get("name") != DEFAULT_MODEL:
            if not need:
                return None
            raise ExportError("--calibration DIR is required: a folder of real images like the model's "
                              f"inputs (the shipped images only fit the embedded {DEFAULT_MODEL})")
        folder = heldout_images()
    try:
        images = list_images(folder)
    except InputError as e:
        raise ExportError(f"calibration set: {e}") from None
    if len(images) < MIN_CALIBRATION_IMAGES:
        raise ExportError(f"calibration set {folder} has {len(images)} images; at least {MIN_CALIBRATION_IMAGES} "
                          "are needed for meaningful activation ranges")
    pre = Preprocessor.from_dict(model["preprocessing"])
    c = pre.input_size[0]
    arrays = []
    for path in images.files[:MAX_CALIBRATION_IMAGES]:
        try:
            arrays.append(pre(path))
        except InputError as e:
            raise ExportError(f"calibration image {e}") from None
    batch = np.stack(arrays).astype(np.float32)
    if batch.shape[1] != c:
        raise ExportError(f"calibration images give {batch.shape[1]} channels, the model takes {c}")
    return batch
