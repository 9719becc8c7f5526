"""fp32 ONNX export with a dynamic batch dimension and everything the runtime needs inside.

The file carries one `metadata_props` entry, "crossvit": a JSON object with the model's
architecture, config, labels and preprocessing (the checkpoint's metadata), the precision,
the batch range, the I/O tensor names and shapes, the exporter versions and the sha256 of
the source checkpoint. `crossvit.runtime` reads that entry and never needs torch.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from crossvit import __version__
from crossvit.contract import (INPUT_NAME, MAX_BATCH, METADATA_KEY, ONNX_FORMAT, OUTPUT_NAME, PROTOBUF_LIMIT,
                               encode_metadata, new_metadata)
from crossvit.errors import ExportError, OutputError, UsageError
from crossvit.files import FILE_MODE, check_output_path, first_line, temp_dir
from crossvit.model.checkpoint import LoadedModel
from crossvit.model.fold import folded_cross_attention

DEFAULT_OPSET = 20
# The dynamo exporter writes opset 18 and newer (older opsets are converted, less reliably).
SUPPORTED_OPSETS = range(18, 24)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BatchRange:
    min: int = 1
    max: int = 64

    def __post_init__(self):
        if not (isinstance(self.min, int) and isinstance(self.max, int)) or self.min < 1:
            raise ExportError(f"batch range needs integers >= 1, got {self.min}:{self.max}")
        if self.max < self.min:
            raise ExportError(f"batch range max {self.max} is smaller than min {self.min}")
        if self.max > MAX_BATCH:
            raise ExportError(f"batch range max {self.max} is over the limit of {MAX_BATCH}")

    @classmethod
    def parse(cls, text: str) -> "BatchRange":
        """'1:64', '8' (static 8) or ':32' (1..32)."""
        try:
            if ":" in text:
                lo, hi = text.split(":", 1)
                return cls(int(lo) if lo.strip() else 1, int(hi))
            n = int(text)
            return cls(n, n)
        except ValueError:  # a value that does not parse: a usage error (exit 2), as a bad number elsewhere
            raise UsageError(f"--batch must look like MIN:MAX (e.g. 1:64) or N, got {text!r}") from None

    @property
    def dynamic(self) -> bool:
        return self.max > self.min


@dataclass
class ExportResult:
    path: Path
    seconds: float
    size_bytes: int
    external_data: bool
    metadata: dict


def _quiet_exporter():
    """The dynamo exporter prints progress lines and torchvision warnings; we print our own."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    return stack


def artifact_metadata(loaded: LoadedModel, *, precision: str, batch: BatchRange, opset: int) -> dict:
    """The JSON stored under metadata_props["crossvit"]."""
    import onnx
    import onnxscript

    c, h, w = loaded.info.preprocessing["input_size"]
    return new_metadata(
        ONNX_FORMAT,
        model=loaded.info.to_dict(),
        precision=precision,
        batch={"min": batch.min, "max": batch.max},
        inputs=[{"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", c, h, w]}],
        outputs=[{"name": OUTPUT_NAME, "dtype": "float32",
                  "shape": ["batch", int(loaded.info.config["num_classes"])]}],
        source={"name": loaded.source.name if loaded.source else None, "sha256": loaded.sha256,
                "random_weights": loaded.info.random_weights},
        exporter={"crossvit": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                  "onnxscript": onnxscript.__version__, "opset": opset},
    )


def check_onnx(path: Path) -> None:
    """Full checker (with strict shape inference) on the written file."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # onnx.checker.ValidationError, InferenceError
        raise ExportError(f"{path.name}: ONNX check failed: {first_line(e)}") from None


def export_onnx(loaded: LoadedModel, out: str | Path, *, batch: BatchRange = BatchRange(),
                opset: int = DEFAULT_OPSET, progress: Progress | None = None) -> ExportResult:
    """Export `loaded.model` to `out` (fp32), checked, atomically written."""
    say = progress or (lambda msg: None)
    out = Path(out)
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(f"opset {opset} is not supported by the exporter (supported: "
                          f"{SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1})")
    check_output_path(out, suffix=".onnx")
    model = loaded.model.eval()
    c, h, w = model.input_shape
    # A batch-1 example specializes the batch dimension to 1 even with dynamic_shapes.
    example_n = min(max(2, batch.min), batch.max)
    example = torch.randn(example_n, c, h, w)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=batch.min, max=batch.max)},) if batch.dynamic else None
    start = time.perf_counter()
    say(f"exporting {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"params, input {c}x{h}x{w}, batch {batch.min}..{batch.max}, opset {opset})")
    try:
        # the CLS-only cross-attentions without a key/value projection of every token: the same
        # function (1e-6), fewer multiply-adds (model/fold.py)
        with folded_cross_attention(model) as folded:
            if folded:
                say(f"{folded} CLS cross-attentions folded: no key/value projection of every token")
            with _quiet_exporter(), torch.no_grad():
                program = torch.onnx.export(
                    model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME], dynamic_shapes=dynamic_shapes, optimize=True,
                    verbose=False)
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {first_line(e)}") from None
    # The exporter annotates every node with its Python stack/module path (about 2 kB a
    # node): useful for debugging the exporter, dead weight in a deployed file.
    for graph in (program.model.graph, *program.model.functions.values()):
        for node in graph:
            node.metadata_props.clear()
    metadata = artifact_metadata(loaded, precision="fp32", batch=batch, opset=opset)
    program.model.metadata_props[METADATA_KEY] = encode_metadata(metadata)
    program.model.producer_name = "crossvit"
    program.model.producer_version = __version__
    weight_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    external = weight_bytes > PROTOBUF_LIMIT - 64 * 1024**2
    say(f"writing {out.name}" + (" with external data (> 2 GB)" if external else ""))
    # Write into a temp folder beside the target, check there, then move into place.
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot write it ({e.strerror or first_line(e)})") from None
    tmpdir = temp_dir(out.parent, hint=out.name)
    try:
        tmp = tmpdir / out.name
        program.save(str(tmp), external_data=external)
        say("checking (onnx.checker full check + shape inference)")
        check_onnx(tmp)
        for p in tmpdir.iterdir():
            if p != tmp:
                os.replace(p, out.parent / p.name)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, out)
    except OSError as e:
        raise OutputError(f"{out}: cannot write it ({e.strerror or first_line(e)})") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return ExportResult(path=out, seconds=time.perf_counter() - start, size_bytes=out.stat().st_size,
                        external_data=external, metadata=metadata)
