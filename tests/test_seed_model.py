"""The seed CrossViT is vit-pytorch's CrossViT: same arguments, same keys, same logits."""

import inspect

import pytest
import torch

from crossvit.errors import ConfigError
from crossvit.model import CrossViT, SeedConfig

CONFIGS = {
    "unequal_widths_heads_depths": dict(
        image_size=32, num_classes=10, sm_dim=32, lg_dim=48, sm_patch_size=4, lg_patch_size=8,
        sm_enc_depth=1, sm_enc_heads=2, sm_enc_dim_head=16, sm_enc_mlp_dim=64,
        lg_enc_depth=3, lg_enc_heads=3, lg_enc_dim_head=8, lg_enc_mlp_dim=96,
        cross_attn_depth=2, cross_attn_heads=2, cross_attn_dim_head=16, depth=2),
    "equal_widths_no_projection": dict(
        image_size=48, num_classes=5, sm_dim=40, lg_dim=40, sm_patch_size=6, lg_patch_size=16,
        sm_enc_mlp_dim=80, lg_enc_mlp_dim=80, sm_enc_dim_head=8, lg_enc_dim_head=8,
        cross_attn_dim_head=8, depth=1),
    "one_channel": dict(
        image_size=24, num_classes=3, sm_dim=16, lg_dim=24, sm_patch_size=2, lg_patch_size=6,
        sm_enc_heads=1, lg_enc_heads=4, sm_enc_mlp_dim=32, lg_enc_mlp_dim=32, sm_enc_dim_head=16,
        lg_enc_dim_head=6, cross_attn_heads=3, cross_attn_dim_head=4, depth=3, channels=1),
    "four_channels_no_cross_attention": dict(
        image_size=16, num_classes=2, sm_dim=8, lg_dim=12, sm_patch_size=4, lg_patch_size=8,
        sm_enc_mlp_dim=16, lg_enc_mlp_dim=16, sm_enc_dim_head=4, lg_enc_dim_head=4,
        cross_attn_depth=0, depth=1, channels=4),
}


def test_constructor_takes_exactly_vit_pytorchs_keywords_and_defaults(vit_pytorch_cross_vit):
    ref = inspect.signature(vit_pytorch_cross_vit.CrossViT.__init__).parameters
    ours = inspect.signature(CrossViT.__init__).parameters
    assert list(ours) == list(ref)
    for name, p in ref.items():
        assert ours[name].default == p.default, name
        assert ours[name].kind == p.kind, name


@pytest.mark.parametrize("name", CONFIGS)
def test_vit_pytorch_state_dict_loads_strictly_and_gives_same_logits(vit_pytorch_cross_vit, name):
    kwargs = CONFIGS[name]
    torch.manual_seed(hash(name) % 1000)
    ref = vit_pytorch_cross_vit.CrossViT(**kwargs).eval()
    ours = CrossViT(**kwargs).eval()
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    assert {k: v.shape for k, v in our_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    ours.load_state_dict(ref_sd, strict=True)
    c, s = kwargs.get("channels", 3), kwargs["image_size"]
    for batch in (1, 3):
        x = torch.randn(batch, c, s, s)
        with torch.no_grad():
            diff = (ours(x) - ref(x)).abs().max().item()
        assert diff <= 1e-5, f"{name}, batch {batch}: max abs diff {diff}"


def test_training_mode_uses_dropout_and_eval_mode_is_deterministic(tiny_seed_kwargs):
    model = CrossViT(**tiny_seed_kwargs, dropout=0.5, emb_dropout=0.5)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_forward_has_no_batch_dependence(tiny_seed_kwargs):
    """Each image's logits depend on that image only (export relies on one graph for all N)."""
    model = CrossViT(**tiny_seed_kwargs).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change, words", [
    (dict(image_size=30), ["image_size=30", "sm_patch_size=4"]),
    (dict(lg_patch_size=7), ["lg_patch_size=7"]),
    (dict(sm_enc_heads=0), ["sm_enc_heads=0"]),
    (dict(cross_attn_heads=-1), ["cross_attn_heads=-1"]),
    (dict(num_classes=0), ["num_classes=0"]),
    (dict(dropout=1.5), ["dropout=1.5"]),
    (dict(depth=2.5), ["depth=2.5"]),
])
def test_impossible_configs_fail_at_construction_naming_the_values(tiny_seed_kwargs, change, words):
    with pytest.raises(ConfigError) as e:
        CrossViT(**{**tiny_seed_kwargs, **change})
    for w in words:
        assert w in str(e.value)


def test_config_round_trips_and_names_unknown_keys(tiny_seed_kwargs):
    cfg = CrossViT(**tiny_seed_kwargs).config
    assert SeedConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown seed CrossViT config keys: patch_size"):
        SeedConfig.from_dict({**cfg.to_dict(), "patch_size": 4})
    with pytest.raises(ConfigError, match="incomplete"):
        SeedConfig.from_dict({"image_size": 32})
