"""The official (IBM / timm) CrossViT family against fixtures made by the real timm.

The fixtures (tests/fixtures/timm/) come from scripts/make_timm_fixtures.py run with timm in a
separate venv; these tests need neither timm nor torchvision.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from crossvit.errors import ConfigError
from crossvit.model import build_model, create_model, get_spec, list_models, load_checkpoint
from crossvit.model.official import (
    SPECS, BicubicResize, OfficialConfig, OfficialCrossViT, checkpoint_filter_fn,
)
from crossvit.model.registry import guess_architecture, resolve_labels

FIXTURES = Path(__file__).parent / "fixtures" / "timm"
FIXTURE_NAMES = ["small_custom", "small_dagger", "small_crop"]
NAMED = [
    "crossvit_tiny_240", "crossvit_small_240", "crossvit_base_240", "crossvit_9_240",
    "crossvit_15_240", "crossvit_18_240", "crossvit_9_dagger_240", "crossvit_15_dagger_240",
    "crossvit_18_dagger_240", "crossvit_15_dagger_408", "crossvit_18_dagger_408",
]
SMALL = dict(img_size=48, img_scale=(1.0, 2 / 3), patch_size=(8, 16), num_classes=5,
             embed_dim=(16, 32), depth=((1, 1, 0), (1, 2, 0)), num_heads=(2, 4), mlp_ratio=(2, 2, 1))


def _fixture(name: str) -> tuple[dict, dict, dict]:
    config = json.loads((FIXTURES / f"{name}.json").read_text())
    state = load_file(str(FIXTURES / f"{name}.safetensors"))
    return config, state, load_file(str(FIXTURES / f"{name}_io.safetensors"))


def _max_abs(model: torch.nn.Module, io: dict) -> float:
    with torch.no_grad():
        return (model.eval()(io["input"]) - io["logits"]).abs().max().item()


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_timm_state_dict_loads_strictly_and_matches_timm_logits(name):
    config, state, io = _fixture(name)
    model = OfficialCrossViT.from_config(OfficialConfig.from_dict(config))
    model.load_state_dict(state, strict=True)
    assert model.input_shape == tuple(io["input"].shape[1:])
    assert _max_abs(model, io) <= 1e-5


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_timm_checkpoint_loads_through_load_checkpoint_with_config_json(name):
    _, _, io = _fixture(name)
    loaded = load_checkpoint(FIXTURES / f"{name}.safetensors", config=FIXTURES / f"{name}.json")
    assert loaded.info.architecture == "official"
    assert _max_abs(loaded.model, io) <= 1e-5


def test_ibm_release_names_are_mapped_by_load_checkpoint(tmp_path):
    config, state, io = _fixture("small_dagger")
    ibm = {k.replace("pos_embed_", "pos_embed.").replace("cls_token_", "cls_token."): v
           for k, v in state.items()}
    assert "pos_embed.0" in ibm and "cls_token.1" in ibm
    path = tmp_path / "ibm_release.pth"
    torch.save({"model": ibm, "epoch": 300}, path)
    loaded = load_checkpoint(path, config=config)
    assert _max_abs(loaded.model, io) <= 1e-5


def test_checkpoint_filter_fn_is_pure_and_passes_timm_names_through():
    _, state, _ = _fixture("small_crop")
    assert checkpoint_filter_fn(state) == state
    ibm = {"pos_embed.0": torch.zeros(1), "cls_token.1": torch.ones(1),
           "blocks.0.projs.0.0.weight": torch.ones(1)}
    out = checkpoint_filter_fn(ibm)
    assert set(out) == {"pos_embed_0", "cls_token_1", "blocks.0.projs.0.0.weight"}
    assert "pos_embed.0" in ibm  # input left untouched


def test_resize_matrices_are_not_in_the_state_dict():
    model = OfficialCrossViT.from_config(OfficialConfig(**SMALL))
    assert not any("branch_resize" in k for k in model.state_dict())
    assert any(isinstance(m, BicubicResize) for m in model.modules())


@pytest.mark.parametrize("name", NAMED)
def test_named_variant_parameter_count_equals_timm(name):
    counts = json.loads((FIXTURES / "param_counts.json").read_text())
    spec = get_spec(name)
    with torch.device("meta"):
        model = build_model(spec.architecture, spec.config)
    assert sum(p.numel() for p in model.parameters()) == counts[name]


@pytest.mark.parametrize("in_size,out_size", [
    ((240, 240), (224, 224)), ((408, 408), (384, 384)), ((48, 48), (32, 32)),
    ((32, 32), (48, 48)), ((40, 64), (30, 48)), ((17, 23), (29, 11)),
])
def test_matmul_resize_matches_interpolate_bicubic(in_size, out_size):
    x = torch.randn(2, 3, *in_size, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(x, size=out_size, mode="bicubic", align_corners=False)
    got = BicubicResize(in_size, out_size)(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


def test_onnx_export_has_no_resize_and_matches_torch(tmp_path):
    import onnx
    import onnxruntime as ort
    model = OfficialCrossViT.from_config(OfficialConfig(**SMALL)).eval()
    path = tmp_path / "official.onnx"
    x = torch.randn(2, *model.input_shape)
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False,
                      input_names=["input"], output_names=["logits"], dynamic_shapes=({0: batch},))
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert "Resize" not in ops, ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, *model.input_shape)
    (got,) = session.run(None, {session.get_inputs()[0].name: x3.numpy()})
    with torch.no_grad():
        expected = model(x3)
    assert got.shape == tuple(expected.shape)
    assert abs(torch.from_numpy(got) - expected).max().item() <= 1e-4


def test_export_folds_the_cls_cross_attention_into_the_same_function(tmp_path):
    """The ONNX export computes each CLS-only cross-attention without projecting every token to
    keys and values (the key bias cancels in the softmax, the value bias passes through weights
    that sum to 1); eager keeps timm's form, and both give the same logits, in torch and from the file."""
    import onnx
    import onnxruntime as ort

    from crossvit.export.onnx import BatchRange, export_onnx
    from crossvit.model import save_checkpoint
    from crossvit.model.fold import folded_cross_attention
    from crossvit.model.official import CrossAttention

    torch.manual_seed(0)
    model = OfficialCrossViT.from_config(OfficialConfig(**SMALL)).eval()
    with torch.no_grad():  # timm starts biases at 0: give them values, so that dropping one would show
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    x = torch.randn(3, *model.input_shape)
    with torch.no_grad():
        plain = model(x)
        with folded_cross_attention(model) as n:
            folded = model(x)
    assert n == 4 and not any(m.folded for m in model.modules() if isinstance(m, CrossAttention))
    assert ((folded - plain).norm() / plain.norm()).item() <= 1e-5
    assert (folded.argmax(1) == plain.argmax(1)).all()

    ckpt = save_checkpoint(model, tmp_path / "small.safetensors", labels=[str(i) for i in range(5)])
    said = []
    path = export_onnx(load_checkpoint(ckpt), tmp_path / "small.onnx", batch=BatchRange(1, 4),
                       progress=said.append).path
    assert "4 CLS cross-attentions folded: no key/value projection of every token" in said
    graph = onnx.load(str(path)).graph
    names = {i.name for i in graph.initializer}
    assert sum(n.endswith(".attn.wk.weight") for n in names) == 4
    assert not any(n.endswith(".attn.wk.bias") for n in names)  # it cancels: not in the graph
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert abs(torch.from_numpy(got) - plain).max().item() <= 1e-4


@pytest.mark.parametrize("changes,message", [
    (dict(img_size=50), "not divisible by patch_size[0]=8"),
    (dict(img_scale=(1.0, 0.7)), "branch 1 image size 33x33"),
    (dict(num_heads=(0, 4)), "num_heads=(0, 4)"),
    (dict(num_heads=(3, 4)), "embed_dim[0]=16 is not divisible by num_heads[0]=3"),
    (dict(embed_dim=(16, 32, 64)), "embed_dim=(16, 32, 64)"),
    (dict(depth=((1, 1),)), "depth=((1, 1),)"),
    (dict(depth=((0, 1, 0),)), "depth=((0, 1, 0),)"),
    (dict(mlp_ratio=(2.0,)), "mlp_ratio=(2.0,) must be 2 or 3 positive numbers"),
    (dict(multi_conv=True), "multi_conv=True needs patch_size in (12, 16), got (8, 16)"),
    (dict(global_pool="max"), "global_pool='max'"),
    (dict(num_classes=0), "num_classes=0"),
])
def test_bad_config_names_the_offending_values(changes, message):
    with pytest.raises(ConfigError, match="invalid official CrossViT config") as err:
        OfficialConfig(**{**SMALL, **changes})
    assert message in str(err.value)


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match="unknown official CrossViT config keys: embed_dims"):
        OfficialConfig.from_dict({**SMALL, "embed_dims": (16, 32)})


def test_config_fields_and_defaults_are_timms():
    timm_defaults = json.loads((FIXTURES / "constructor_defaults.json").read_text())
    assert {f.name for f in dataclasses.fields(OfficialConfig)} == set(timm_defaults)
    assert OfficialConfig.from_dict(timm_defaults) == OfficialConfig()


def test_config_round_trips_through_json():
    config = OfficialConfig(**SMALL)
    again = OfficialConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert again.img_size == (48, 48) and again.depth == ((1, 1, 0), (1, 2, 0))
    assert guess_architecture(config.to_dict()) == "official"


def test_create_model_builds_crossvit_9_240():
    model = create_model("crossvit_9_240")
    assert isinstance(model, OfficialCrossViT)
    assert model.input_shape == (3, 240, 240)
    assert model.config.branch_sizes == ((240, 240), (224, 224))
    assert model.state_dict()["pos_embed_1"].shape == (1, 1 + 14 * 14, 256)


def test_list_models_has_every_named_variant_with_timm_preprocessing():
    assert set(NAMED) <= set(list_models())
    assert [s.name for s in SPECS] == NAMED
    for name in NAMED:
        pre = get_spec(name).preprocessing
        size = 408 if name.endswith("408") else 240
        assert pre.input_size == (3, size, size)
        assert pre.crop_pct == (1.0 if size == 408 else 0.875)
        assert pre.interpolation == "bicubic"


def test_imagenet_labels_ship_with_the_package():
    names = resolve_labels("imagenet-1k", 1000)
    assert names[0] == "tench" and names[999] == "toilet tissue"


def test_named_model_loads_a_timm_style_checkpoint_by_name_and_through_the_cli(tmp_path, cli):
    """`create_model(name, checkpoint=PATH)` and `crossvit convert --model NAME` with a nested,
    IBM-named .pth of a real-size named variant (random weights stand in for released ones)."""

    torch.manual_seed(0)
    ref = create_model("crossvit_tiny_240").eval()
    sd = {k.replace("pos_embed_", "pos_embed.").replace("cls_token_", "cls_token."): v
          for k, v in ref.state_dict().items()}
    assert "pos_embed.0" in sd
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 299}, tmp_path / "ibm.pth")
    ours = create_model("crossvit_tiny_240", checkpoint=tmp_path / "ibm.pth")
    x = torch.randn(2, 3, 240, 240)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
    proc = cli("convert", tmp_path / "ibm.pth", "--model", "crossvit_tiny_240", "-o", tmp_path / "tiny.safetensors")
    assert proc.returncode == 0, proc.stderr
    loaded = load_checkpoint(tmp_path / "tiny.safetensors")
    assert loaded.info.name == "crossvit_tiny_240" and len(loaded.info.labels) == 1000
    assert loaded.info.preprocessing["input_size"] == [3, 240, 240]
