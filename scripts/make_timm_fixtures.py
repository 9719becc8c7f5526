"""Make the reference fixtures in tests/fixtures/timm/ with the REAL timm.

tests/test_official.py checks `crossvit.model.official` against these files without needing
timm. Run this only to regenerate them, in a separate venv outside the repository (timm needs
torchvision; see DESIGN.md):

    python3 -m venv /tmp/timmvenv
    /tmp/timmvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm
    /tmp/timmvenv/bin/python scripts/make_timm_fixtures.py

Deterministic (fixed seeds). For each small config below it writes
    NAME.safetensors     timm's state_dict (random init, perturbed so no weight is trivial)
    NAME_io.safetensors  `input` (B, C, H, W) and timm's eval-mode `logits`
    NAME.json            the timm `CrossVit` keyword arguments
and `param_counts.json` (parameter count of every named timm crossvit model),
`constructor_defaults.json` (timm's `CrossVit` keyword arguments and defaults, minus the
non-data ones) and `versions.json` (timm and torch versions used).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from timm.models.crossvit import CrossVit

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "timm"
BATCH = 3

CONFIGS = {
    # non-square image, bicubic downsample of the second branch, nested cross-attention depths
    "small_custom": dict(
        img_size=(48, 64), img_scale=(1.0, 0.75), patch_size=(8, 12), in_chans=3, num_classes=7,
        embed_dim=(16, 32), depth=((1, 2, 0), (2, 1, 2)), num_heads=(2, 4), mlp_ratio=(2.0, 3.0, 1.0),
    ),
    # the three-conv "dagger" patch embedding, bicubic upsample of the second branch
    "small_dagger": dict(
        img_size=48, img_scale=(1.0, 4 / 3), patch_size=(12, 16), in_chans=3, num_classes=5,
        embed_dim=(16, 32), depth=((1, 2, 0), (1, 1, 0)), num_heads=(2, 2), mlp_ratio=(3.0, 3.0, 1.0),
        multi_conv=True,
    ),
    # centre crop instead of resize, one input channel, no qkv bias, average pooling
    "small_crop": dict(
        img_size=40, img_scale=(1.0, 0.8), patch_size=(8, 16), in_chans=1, num_classes=4,
        embed_dim=(16, 24), depth=((1, 1, 1), (1, 2, 0)), num_heads=(2, 3), mlp_ratio=(2.0, 2.0, 1.0),
        crop_scale=True, qkv_bias=False, global_pool="avg",
    ),
}

NAMED = [
    "crossvit_tiny_240", "crossvit_small_240", "crossvit_base_240", "crossvit_9_240",
    "crossvit_15_240", "crossvit_18_240", "crossvit_9_dagger_240", "crossvit_15_dagger_240",
    "crossvit_18_dagger_240", "crossvit_15_dagger_408", "crossvit_18_dagger_408",
]


def make_fixture(name: str, kwargs: dict, seed: int) -> None:
    torch.manual_seed(seed)
    model = CrossVit(**kwargs).eval()
    with torch.no_grad():  # timm's init leaves biases 0 and norms 1: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    h, w = model.img_size
    x = torch.randn(BATCH, kwargs.get("in_chans", 3), h, w)
    with torch.no_grad():
        logits = model(x)
    save_file(state, str(OUT / f"{name}.safetensors"))
    save_file({"input": x, "logits": logits.contiguous()}, str(OUT / f"{name}_io.safetensors"))
    for path in (OUT / f"{name}.safetensors", OUT / f"{name}_io.safetensors"):
        path.chmod(0o644)  # safetensors writes owner-only files
    (OUT / f"{name}.json").write_text(json.dumps(kwargs, indent=1) + "\n")
    print(f"{name}: {sum(v.numel() for v in state.values())} params, branch sizes "
          f"{model.img_size_scaled}, logits {tuple(logits.shape)}")


def param_counts() -> dict[str, int]:
    counts = {}
    for name in NAMED:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            model = timm.create_model(name, pretrained=False)
        counts[name] = sum(p.numel() for p in model.parameters())
        print(f"{name}: {counts[name]:,} parameters")
    return counts


def constructor_defaults() -> dict:
    """timm's CrossVit arguments with their defaults; layers and device/dtype are not config data."""
    skip = {"self", "norm_layer", "device", "dtype"}
    return {name: p.default for name, p in inspect.signature(CrossVit.__init__).parameters.items()
            if name not in skip}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for i, (name, kwargs) in enumerate(CONFIGS.items()):
        make_fixture(name, kwargs, seed=1000 + i)
    (OUT / "param_counts.json").write_text(json.dumps(param_counts(), indent=1) + "\n")
    (OUT / "constructor_defaults.json").write_text(json.dumps(constructor_defaults(), indent=1) + "\n")
    (OUT / "versions.json").write_text(json.dumps(
        {"timm": timm.__version__, "torch": torch.__version__}, indent=1) + "\n")


if __name__ == "__main__":
    main()
