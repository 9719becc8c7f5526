"""What every inference backend shares: the `Session` base (input checks, batch splitting and
padding, `predict` on image files), its records (`InputSpec`, `Prediction`) and the CPU thread
count. The backends (runtime/session.py: ONNX Runtime and PyTorch; runtime/openvino.py;
runtime/tensorrt.py) import it; only runtime/session.py names them all.
"""

from __future__ import annotations

import logging
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crossvit.contract import PRECISION_TABLE
from crossvit.errors import ArtifactError, ConfigError, InputError

from .artifact import ArtifactInfo

log = logging.getLogger("crossvit.runtime")


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, int, int]  # C, H, W
    dtype: str
    batch_min: int
    batch_max: int


@dataclass(frozen=True)
class Prediction:
    """Top-k classes of one image, or the reason it could not be answered."""

    source: str
    labels: tuple[str, ...] = ()
    indices: tuple[int, ...] = ()
    probs: tuple[float, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        if not self.ok:
            return {"source": self.source, "error": self.error}
        return {"source": self.source,
                "top": [{"label": l, "index": i, "prob": round(p, 6)}
                        for l, i, p in zip(self.labels, self.indices, self.probs)]}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z, dtype=np.float64)
    return e / e.sum(axis=-1, keepdims=True)


class Session:
    """Base class: validation, batching and prediction; backends implement `_run`."""

    backend = "base"

    def __init__(self, info: ArtifactInfo):
        self.info = info
        self.device = "cpu"
        self.chosen: str | None = None  # why open_session ran another file than the one given
        # why open_session ran the fp32 file given although other CPU paths lie beside it
        self.passed_over: str | None = None
        self._closed = False
        self._preprocessor = None

    # -- life cycle ---------------------------------------------------------------------
    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True

    # -- facts --------------------------------------------------------------------------
    @property
    def input_spec(self) -> InputSpec:
        i = self.info
        return InputSpec(i.input_name, i.input_shape, "float32", i.batch_min, i.batch_max)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.info.labels

    def describe(self) -> str:
        return f"{self.backend} ({self.device}, {self.info.precision})"

    @property
    def batch_invariant(self) -> bool:
        """False for a file whose rows' answers depend on their batch-mates (dynamic int8): `infer`
        then runs it one row at a time, so a row gets the same answer alone or in any batch."""
        spec = PRECISION_TABLE.get(self.info.precision)
        return spec is None or spec.batch_invariant

    def prepare(self, max_batch: int) -> str | None:
        """Do now what the first batches of up to `max_batch` rows would otherwise wait for (a
        server calls it before it listens); what was done, in a few words, or None. Most backends
        are ready when opened."""
        return None

    # -- inference ----------------------------------------------------------------------
    def validate(self, batch) -> np.ndarray:
        """Check type, dtype, rank and C x H x W; say exactly what was received."""
        c, h, w = self.info.input_shape
        if not isinstance(batch, np.ndarray):
            raise InputError(f"infer expects a numpy.ndarray of shape (N, {c}, {h}, {w}), "
                             f"got {type(batch).__name__}")
        if batch.dtype != np.float32:
            raise InputError(f"infer expects dtype float32, got {batch.dtype} "
                             f"(convert with batch.astype(np.float32))")
        if batch.ndim != 4:
            raise InputError(f"infer expects a 4-D batch (N, {c}, {h}, {w}), got shape {batch.shape}")
        if tuple(batch.shape[1:]) != (c, h, w):
            raise InputError(f"infer expects images of shape ({c}, {h}, {w}), got {tuple(batch.shape[1:])} "
                             f"(batch shape {batch.shape})")
        if batch.shape[0] < 1:
            raise InputError("infer got an empty batch (N = 0)")
        if not np.isfinite(batch).all():
            bad = int(np.argwhere(~np.isfinite(batch).reshape(len(batch), -1).all(axis=1))[0, 0])
            raise InputError(f"infer got NaN or infinite values (first in image {bad} of the batch)")
        return np.ascontiguousarray(batch)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, num_classes) float32 for a preprocessed batch."""
        if self._closed:
            raise ArtifactError(f"session for {self.info.path.name} is closed")
        x = self.validate(batch)
        n, lo, hi = x.shape[0], self.info.batch_min, self.info.batch_max
        step = hi if self.batch_invariant else 1  # one row (padded to the minimum) at a time
        if lo <= n <= step:
            return self._checked_run(x)
        outs = []
        for start in range(0, n, step):
            chunk = x[start:start + step]
            k = chunk.shape[0]
            if k < lo:  # pad up to the artifact's minimum batch, then drop the padding
                pad = np.zeros((lo - k, *chunk.shape[1:]), dtype=np.float32)
                chunk = np.concatenate([chunk, pad])
            outs.append(self._checked_run(np.ascontiguousarray(chunk))[:k])
        return np.concatenate(outs)

    def _checked_run(self, x: np.ndarray) -> np.ndarray:
        """`_run`, and its logits checked against the metadata: (N, num_classes). A graph whose
        output dims are symbolic passes the load-time check whatever it computes; more columns
        than labels would index past them, fewer would be labelled wrongly."""
        logits = self._run(x)
        want = (x.shape[0], self.info.num_classes)
        shape = tuple(getattr(logits, "shape", ()))
        if shape != want:
            raise ArtifactError(f"{self.info.path}: the model gave logits of shape {shape}, expected "
                                f"{want} (batch, classes): its metadata has {want[1]} labels")
        return logits

    def _run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @property
    def preprocessor(self):
        if self._preprocessor is None:
            from .preprocess import Preprocessor

            self._preprocessor = Preprocessor.from_dict(self.info.preprocessing)
        return self._preprocessor

    def predict(self, images, top_k: int = 5, batch_size: int | None = None) -> list[Prediction]:
        """Top-k labels for image paths, bytes or PIL images; a bad one gets an error entry.

        `images` is one image (a path, bytes, a PIL image) or a list of them.
        """
        from PIL import Image

        from .preprocess import preprocess_files

        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
            raise ConfigError(f"top_k must be an integer >= 1, got {top_k!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                                       or batch_size < 1):
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        top_k = min(int(top_k), self.info.num_classes)
        batch_size = int(batch_size or min(self.info.batch_max, 32))
        single = isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image))
        try:
            items = [images] if single else list(images)
        except TypeError:  # None, a number
            raise InputError(f"images must be a path, bytes, a PIL image or a list of them, got "
                             f"{type(images).__name__}") from None
        results: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            group = items[start:start + batch_size]
            array, good, errors = preprocess_files(group, self.preprocessor)
            logits = self.infer(array) if len(good) else np.zeros((0, self.info.num_classes), np.float32)
            finite = np.isfinite(logits).all(axis=1)
            probs = softmax(np.where(finite[:, None], logits, 0))
            top = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
            gi = ei = 0
            for j, item in enumerate(group):  # good and errors are both in input order
                name = str(item) if isinstance(item, (str, Path)) else f"image {start + j}"
                if gi < len(good) and good[gi] is item and not finite[gi]:
                    results.append(Prediction(source=name, error=f"{name}: the model gave non-finite "
                                                                 "logits (NaN or infinity) for this image"))
                    gi += 1
                elif gi < len(good) and good[gi] is item:
                    idx = tuple(int(i) for i in top[gi])
                    results.append(Prediction(source=name, labels=tuple(self.labels[i] for i in idx),
                                              indices=idx, probs=tuple(float(probs[gi, i]) for i in idx)))
                    gi += 1
                else:
                    results.append(Prediction(source=name, error=errors[ei][1]))
                    ei += 1
        return results


def intra_op_threads() -> int | None:
    """Threads for ONNX Runtime's intra-op pool, or None for its default.

    ORT's default is one thread per physical core of the machine. A process restricted to
    fewer CPUs (taskset, a container's cpuset) would then oversubscribe them: use the CPUs it
    may run on instead.
    """
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None
    return allowed if allowed < (os.cpu_count() or allowed) else None
