"""Checkpoint I/O: our safetensors round trip, foreign state dicts, and every bad-input case."""

import json
import os
from pathlib import Path

import pytest
import torch

from crossvit.errors import CheckpointError, ConfigError, OutputError
from crossvit.model import CrossViT, create_model, list_models, load_checkpoint, save_checkpoint
from crossvit.model.checkpoint import read_weights


@pytest.fixture
def model(tiny_seed_kwargs):
    torch.manual_seed(0)
    return CrossViT(**tiny_seed_kwargs).eval()


@pytest.fixture
def x():
    return torch.randn(2, 3, 32, 32)


def logits(m, x):
    with torch.no_grad():
        return m(x)


LABELS = [f"kind {i}" for i in range(7)]


def test_safetensors_round_trip_rebuilds_model_from_file_alone(tmp_path, model, x):
    path = save_checkpoint(model, tmp_path / "m.safetensors", labels=LABELS,
                           preprocessing=dict(input_size=[3, 32, 32], crop_pct=0.9, mean=[0.5] * 3,
                                              std=[0.25] * 3), provenance={"dataset": "unit test"})
    loaded = load_checkpoint(path)
    assert torch.equal(logits(loaded.model, x), logits(model, x))
    assert loaded.info.architecture == "seed"
    assert loaded.info.config == model.config.to_dict()
    assert loaded.info.labels == LABELS
    assert loaded.info.preprocessing["crop_pct"] == 0.9
    assert loaded.info.preprocessing["std"] == [0.25] * 3
    assert loaded.info.provenance["dataset"] == "unit test"
    assert "torch_version" in loaded.info.provenance
    assert len(loaded.sha256) == 64
    assert not loaded.model.training
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp files left


def test_save_refuses_labels_that_do_not_match_num_classes(tmp_path, model):
    with pytest.raises(ConfigError, match="3 labels given for a model with 7 classes"):
        save_checkpoint(model, tmp_path / "m.safetensors", labels=["a", "b", "c"])
    assert not list(tmp_path.iterdir())


def test_failed_save_leaves_no_file(tmp_path, model, monkeypatch):
    import safetensors.torch

    def boom(*a, **k):
        Path(a[1]).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OutputError, match=r"m\.safetensors: cannot write it \(disk full\)"):
        save_checkpoint(model, tmp_path / "m.safetensors", labels=LABELS)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "model_ema", "module_prefix",
                                  "nested_with_optimizer"])
def test_foreign_pickled_state_dicts_load_with_a_config(tmp_path, model, x, tiny_seed_kwargs, suffix, wrap):
    sd = model.state_dict()
    obj = {
        "bare": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd, "optimizer": {"lr": 0.1}},
        "model_ema": {"model_ema": sd, "model": {k: torch.zeros_like(v) for k, v in sd.items()}},
        "module_prefix": {f"module.{k}": v for k, v in sd.items()},
        "nested_with_optimizer": {"checkpoint": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}},
    }[wrap]
    path = tmp_path / f"foreign{suffix}"
    torch.save(obj, path)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_seed_kwargs))
    loaded = load_checkpoint(path, config=cfg)
    assert torch.equal(logits(loaded.model, x), logits(model, x))
    assert loaded.info.labels == [f"class_{i}" for i in range(7)]
    assert loaded.info.preprocessing["input_size"] == [3, 32, 32]


def test_foreign_checkpoint_with_full_config_file_keeps_labels_and_preprocessing(tmp_path, model, tiny_seed_kwargs):
    torch.save(model.state_dict(), tmp_path / "w.pth")
    (tmp_path / "c.json").write_text(json.dumps({
        "architecture": "seed", "config": tiny_seed_kwargs, "labels": LABELS,
        "preprocessing": {"input_size": [3, 32, 32], "crop_pct": 1.0, "mean": [0, 0, 0], "std": [1, 1, 1]}}))
    loaded = load_checkpoint(tmp_path / "w.pth", config=tmp_path / "c.json")
    assert loaded.info.labels == LABELS and loaded.info.preprocessing["crop_pct"] == 1.0


def test_vit_pytorch_trained_checkpoint_loads_by_model_name(tmp_path, vit_pytorch_cross_vit):
    kwargs = dict(create_model("crossvit_digits").config.to_dict())
    ref = vit_pytorch_cross_vit.CrossViT(**kwargs).eval()
    torch.save({"model": ref.state_dict()}, tmp_path / "vp.pth")
    loaded = load_checkpoint(tmp_path / "vp.pth", name="crossvit_digits")
    x = torch.randn(3, 3, 32, 32)
    assert (logits(loaded.model, x) - logits(ref, x)).abs().max() <= 1e-5
    assert loaded.info.labels == [str(i) for i in range(10)]


def test_foreign_safetensors_without_metadata_needs_a_name(tmp_path, model):
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "f.safetensors"))
    with pytest.raises(CheckpointError, match="foreign checkpoint .*--model NAME"):
        load_checkpoint(tmp_path / "f.safetensors")


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/crossvit_pwned",))


def test_checkpoint_needing_arbitrary_unpickling_is_refused_never_executed(tmp_path):
    marker = Path("/tmp/crossvit_pwned")
    marker.unlink(missing_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused: .*arbitrary unpickling"):
        read_weights(tmp_path / "evil.pth")
    assert not marker.exists()


def test_missing_and_unexpected_keys_are_counted_and_listed(tmp_path, model, tiny_seed_kwargs):
    sd = dict(model.state_dict())
    removed = [k for k in sd if "lg_mlp_head" in k]
    for k in removed:
        del sd[k]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "w.pt", config=tiny_seed_kwargs)
    msg = str(e.value)
    assert f"{len(removed)} missing keys (lg_mlp_head.0.weight" in msg
    assert "1 unexpected key (extra.weight)" in msg
    assert "\n" not in msg


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path, model, tiny_seed_kwargs):
    torch.save(model.state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatch for sm_mlp_head\.1\.weight: checkpoint has "
                                              r"\(7, 32\), model expects \(9, 32\)"):
        load_checkpoint(tmp_path / "w.pt", config={**tiny_seed_kwargs, "num_classes": 9})


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "truncated_safetensors",
                                  "truncated_pth", "random_bytes", "text", "json", "list_pickle"])
def test_bad_checkpoint_files_get_one_clear_line(tmp_path, model, case):
    path = tmp_path / "bad.pth"
    if case == "missing":
        path = tmp_path / "nope.safetensors"
    elif case == "directory":
        path = tmp_path
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated_safetensors":
        good = save_checkpoint(model, tmp_path / "good.safetensors", labels=LABELS)
        path = tmp_path / "bad.safetensors"
        path.write_bytes(good.read_bytes()[:5000])
    elif case == "truncated_pth":
        torch.save(model.state_dict(), tmp_path / "good.pth")
        path.write_bytes((tmp_path / "good.pth").read_bytes()[:5000])
    elif case == "random_bytes":
        path.write_bytes(os.urandom(4096))
    elif case == "text":
        path.write_text("this is not a checkpoint\n" * 10)
    elif case == "json":
        path = tmp_path / "bad.safetensors"
        path.write_text('{"a": 1}')
    elif case == "list_pickle":
        torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, name="crossvit_digits")
    assert str(path) in str(e.value)
    assert "\n" not in str(e.value)


def test_registry_lists_the_default_model_and_suggests_close_names():
    assert "crossvit_digits" in list_models()
    with pytest.raises(ConfigError, match="did you mean crossvit_digits"):
        create_model("crossvit_digit")


def test_a_weightless_model_draws_its_weights_from_a_recorded_seed_without_touching_the_callers():
    """A registered model that ships no weights is initialized from torch's generator seeded with
    `init_seed` (default 0), so a deploy's files and gates repeat run to run; the caller's
    generator is left as it was; the seed and a digest of the weights are in the provenance."""
    from crossvit.errors import ConfigError
    from crossvit.model import load_model
    from crossvit.model.loader import weights_sha256

    for name, kwargs in (("crossvit_tiny_240", {}), ("crossvit_digits", {"pretrained": False})):
        torch.manual_seed(123)
        a = load_model(name=name, **kwargs)
        after = torch.rand(4)
        torch.manual_seed(123)
        assert torch.equal(after, torch.rand(4)), "load_model moved the caller's generator"
        b, other = load_model(name=name, **kwargs), load_model(name=name, init_seed=1, **kwargs)
        sa, sb, so = a.model.state_dict(), b.model.state_dict(), other.model.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not all(torch.equal(sa[k], so[k]) for k in sa)
        assert a.info.random_weights and a.info.provenance["init_seed"] == 0 and other.info.provenance["init_seed"] == 1
        assert a.info.provenance["weights_sha256"] == b.info.provenance["weights_sha256"] == weights_sha256(a.model)
        assert other.info.provenance["weights_sha256"] != a.info.provenance["weights_sha256"]
        # init_seed=None: the caller's generator as it stands, and no seed recorded
        torch.manual_seed(5)
        c = load_model(name=name, init_seed=None, **kwargs)
        torch.manual_seed(5)
        d = load_model(name=name, init_seed=None, **kwargs)
        assert "init_seed" not in c.info.provenance
        assert c.info.provenance["weights_sha256"] == d.info.provenance["weights_sha256"] != a.info.provenance["weights_sha256"]
    for bad in (-1, 2 ** 64):
        with pytest.raises(ConfigError, match="outside 0..2"):
            load_model(name="crossvit_tiny_240", init_seed=bad)


def test_create_model_with_overrides_and_checkpoint(tmp_path, x):
    m = create_model("crossvit_digits", num_classes=4)
    assert m.config.num_classes == 4
    save_checkpoint(m, tmp_path / "m.safetensors", labels=list("abcd"))
    again = create_model("crossvit_digits", checkpoint=tmp_path / "m.safetensors")
    assert torch.equal(logits(again, x), logits(m.eval(), x))
