"""Shared fixtures; a `gpu` marker for tests that need CUDA (skipped without a device) and a
`no_gpu` marker for tests of what happens on a machine without one (skipped where CUDA is)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The one tiny seed config: unequal branch widths, heads and depths, fast enough for every test.
TINY_SEED = dict(image_size=32, num_classes=7, sm_dim=32, lg_dim=48, sm_patch_size=4, lg_patch_size=8,
                 sm_enc_depth=1, sm_enc_heads=2, sm_enc_dim_head=16, sm_enc_mlp_dim=64,
                 lg_enc_depth=2, lg_enc_heads=3, lg_enc_dim_head=8, lg_enc_mlp_dim=96,
                 cross_attn_depth=1, cross_attn_heads=2, cross_attn_dim_head=16, depth=2)


def random_png(path: Path, size: tuple[int, int] = (40, 40), seed: int = 0) -> Path:
    """An RGB PNG of uniform noise at `path` (width, height = size)."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def rewrite_onnx_metadata(src: Path, dst: Path, change) -> Path:
    """A copy of the ONNX `src` at `dst` after `change(meta, proto)` edited its crossvit metadata (the raw
    JSON, unchecked: it may be made to lie) and, if it likes, the graph."""
    import json

    import onnx

    from crossvit.contract import METADATA_KEY, write_onnx_metadata

    proto = onnx.load(str(src))
    meta = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    change(meta, proto)
    write_onnx_metadata(proto, meta)
    onnx.save(proto, str(dst))
    return dst


def _h100():
    from crossvit.runtime.gpu import CudaDevice

    return CudaDevice(0, "NVIDIA H100 80GB HBM3", (9, 0), "12.8", "12.8")


H100 = _h100()  # a GPU this machine need not have, for the rules that read manifests


def engine_io(info, profile=None, **change) -> list[dict]:
    """The I/O list a TensorRT engine of the ONNX `info` reports (as the manifest records it);
    `change`: `in__FIELD=value` / `out__FIELD=value` to make it differ."""
    from crossvit.export.engine import Profile

    profile = profile or Profile(1, 8, 64)
    c, h, w = info.input_shape
    io = [{"name": "input", "mode": "input", "dtype": "float32", "shape": [-1, c, h, w],
           "profile": [[profile.min, c, h, w], [profile.opt, c, h, w], [profile.max, c, h, w]]},
          {"name": "logits", "mode": "output", "dtype": "float32", "shape": [-1, info.num_classes]}]
    for key, value in change.items():
        which, field = key.split("__")
        io[0 if which == "in" else 1][field] = value
    return io


def fake_plan(onnx_path: Path, folder: Path, *, profile=None, device=H100, trt: str = "10.13.0.35",
              library: str = "tensorrt", targets=(), **options) -> Path:
    """`folder/STEM.plan`: not a real engine, with a real manifest of `onnx_path`, as `crossvit build`
    writes them (for the rules that read manifests, on machines without TensorRT or a GPU)."""
    import hashlib

    from crossvit.export.engine import BuildOptions, Profile, engine_manifest, write_plan
    from crossvit.files import sha256_file
    from crossvit.runtime.artifact import read_artifact
    from crossvit.runtime.trt_library import get_library

    info = read_artifact(onnx_path)
    profile = profile or Profile(1, 8, 64)
    body = b"not a real engine"
    manifest = engine_manifest(info, onnx_sha256=sha256_file(onnx_path), plan_sha256=hashlib.sha256(body).hexdigest(),
                               profile=profile, io=engine_io(info, profile), library=get_library(library),
                               version=trt, targets=list(targets), device=device, options=BuildOptions(**options),
                               seconds=1.0)
    folder.mkdir(parents=True, exist_ok=True)
    plan = folder / f"{Path(onnx_path).stem}.plan"
    write_plan(plan, body, manifest)
    return plan


def run_crossvit(*args, cwd=None, timeout: float = 900, stdin=None) -> subprocess.CompletedProcess:
    """`python -m crossvit ARGS...` in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "crossvit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, input=stdin)


def check_one_line_error(proc: subprocess.CompletedProcess, words: str, code: int = 1) -> str:
    """The bad-input contract: exit `code`, no traceback, and exactly one error line on stderr,
    which contains `words`. Returns that line."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert words in errors[0], (words, errors[0])
    return errors[0]


@pytest.fixture
def cli():
    """Run the `crossvit` command: `cli("predict", path, ...)` -> CompletedProcess."""
    return run_crossvit


@pytest.fixture
def one_line_error():
    """`one_line_error(proc, words, code=1)`: see `check_one_line_error`."""
    return check_one_line_error


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    marker, why = ("no_gpu", "tests the machine without a CUDA device") if _has_cuda() else ("gpu", "needs a CUDA device")
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if marker in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory):
    """The embedded model's fp32 ONNX, batch 1..64 (one per test module: tests may put files beside it)."""
    from crossvit.export.onnx import BatchRange, export_onnx
    from crossvit.model import load_model

    return export_onnx(load_model(name="crossvit_digits"), tmp_path_factory.mktemp("digits") / "digits.onnx",
                       batch=BatchRange(1, 64)).path


@pytest.fixture(scope="session")
def vit_pytorch_cross_vit():
    """The real vit-pytorch `cross_vit.py`, loaded from its file.

    `import vit_pytorch` would import torchvision (absent with the CPU torch build); the
    cross_vit module itself needs only torch and einops.
    """
    spec = importlib.util.find_spec("vit_pytorch")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("vit-pytorch is not installed: `pip install --no-deps vit-pytorch einops` "
                    "(make test does this)")
    path = os.path.join(spec.submodule_search_locations[0], "cross_vit.py")
    mod_spec = importlib.util.spec_from_file_location("vit_pytorch_cross_vit", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    sys.modules.setdefault("vit_pytorch_cross_vit", module)
    return module


@pytest.fixture
def tiny_seed_kwargs():
    """TINY_SEED, a fresh copy for each test."""
    return dict(TINY_SEED)


@pytest.fixture(scope="session")
def small_artifacts(tmp_path_factory):
    """A small random seed CrossViT: its checkpoint and an fp32 ONNX export (batch 1..8)."""
    import torch

    from crossvit.export.onnx import BatchRange, export_onnx
    from crossvit.model import CrossViT, load_checkpoint, save_checkpoint

    torch.manual_seed(3)
    root = tmp_path_factory.mktemp("small")
    model = CrossViT(**{**TINY_SEED, "num_classes": 10})
    ckpt = save_checkpoint(model, root / "small.safetensors", labels=[str(i) for i in range(10)],
                           preprocessing=dict(input_size=[3, 32, 32], crop_pct=1.0, mean=[0.5] * 3, std=[0.5] * 3))
    onnx_path = export_onnx(load_checkpoint(ckpt), root / "small.onnx", batch=BatchRange(1, 8)).path
    return ckpt, onnx_path
