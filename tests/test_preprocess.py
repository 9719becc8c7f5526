"""runtime/preprocess.py: decoding untrusted images and timm's eval transform without torch.

Images are generated at run time (smooth gradients + noise, so resizing has something to
do); torch is used only for the reference recipe, never by the module under test.
"""

from __future__ import annotations

import ast
import io
import math
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from crossvit.errors import ConfigError, InputError
from crossvit.runtime import preprocess as pp
from crossvit.runtime.preprocess import FileBatch, Preprocessor, load_image, preprocess_files

MODULE = Path(pp.__file__)
IMAGENET = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def natural(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth colour gradients plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([127 + 100 * np.sin(3 * x / width + c) * np.cos(2 * y / height - c) for c in range(3)], -1)
    noisy = base + rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def make(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic", **kw) -> Preprocessor:
    return Preprocessor.from_dict({"input_size": list(input_size), "crop_pct": crop_pct,
                                   "interpolation": interpolation, **(kw or IMAGENET)})


# ---------------------------------------------------------------- reference recipe in torch


def torch_reference(img: Image.Image, size: int, crop_pct: float, interpolation: str) -> torch.Tensor:
    """timm's eval transform for a square size, written out with torch for everything after
    the resize (torchvision is not installed; its Resize on a PIL image *is* Pillow's resize)."""
    img = img.convert("RGB")  # timm's loader
    scale = math.floor(size / crop_pct)
    w, h = img.size
    if w <= h:  # torchvision _compute_resized_output_size: longer side truncated
        new_w, new_h = scale, int(scale * h / w)
    else:
        new_w, new_h = int(scale * w / h), scale
    img = img.resize((new_w, new_h), PIL_FILTERS[interpolation])
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous().float().div(255)  # ToTensor
    top = int(round((new_h - size) / 2.0))  # torchvision center_crop
    left = int(round((new_w - size) / 2.0))
    t = t[:, top:top + size, left:left + size]
    mean = torch.tensor(IMAGENET["mean"])
    std = torch.tensor(IMAGENET["std"])
    return (t - mean[:, None, None]) / std[:, None, None]  # Normalize


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
@pytest.mark.parametrize("wh", [(300, 200), (17, 400), (240, 240)])
def test_matches_timm_eval_recipe_in_torch(wh, crop_pct, interpolation):
    img = natural(*wh, seed=wh[0])
    ours = make((3, 224, 224), crop_pct, interpolation)(img)
    ref = torch_reference(img, 224, crop_pct, interpolation).numpy()
    assert ours.shape == ref.shape == (3, 224, 224) and ours.dtype == np.float32
    # Same pixels, same float32 operations in the same order: measured 0.0 everywhere.
    assert np.abs(ours - ref).max() <= 1e-2
    assert np.abs(ours - ref).max() <= 1e-6


def test_output_sizes_follow_torchvision_arithmetic():
    p = make((3, 224, 224), 0.875)  # floor(224 / 0.875) = 256
    assert p.resize_size(300, 200) == (384, 256)
    assert p.resize_size(17, 400) == (256, 6023)  # int(256 * 400 / 17) = 6023.5 truncated
    assert p.resize_size(240, 240) == (256, 256)
    assert make((3, 240, 240), 0.875).resize_size(640, 480) == (365, 274)  # floor(274.28)
    # centre crop rounds half to even, as Python's round in torchvision's center_crop
    assert p.crop_box(257, 256) == (16, 16)  # (257 - 224) / 2 = 16.5 -> 16
    assert p.crop_box(259, 256) == (16, 18)  # 17.5 -> 18


def test_non_square_input_size_covers_then_centre_crops():
    p = make((3, 160, 224), 1.0)
    img = natural(300, 200)
    # timm ResizeKeepRatio: ratio = min(200 / 160, 300 / 224); sides rounded
    ratio = min(200 / 160, 300 / 224)
    assert p.resize_size(300, 200) == (round(300 / ratio), round(200 / ratio)) == (240, 160)
    out = p(img)
    assert out.shape == (3, 160, 224)
    resized = np.asarray(img.resize((240, 160), Image.Resampling.BICUBIC), np.float32) / 255
    expected = (resized[:, 8:232] - np.float32(IMAGENET["mean"])) / np.float32(IMAGENET["std"])
    np.testing.assert_allclose(out, expected.transpose(2, 0, 1), atol=1e-5)


def test_pillow_bicubic_vs_torch_antialiased_interpolate():
    """Where Pillow and torch differ: torchvision on *tensors* resizes with F.interpolate.

    With antialias=True torch follows Pillow's algorithm in float; Pillow works in uint8 with
    a rounding between its two passes. Measured on this image, 8-bit levels after rounding
    torch's output: downscale bicubic 1, bilinear 1; upscale bicubic 2 (overshoot clipped
    differently). Without antialias a downscale differs by tens of levels (aliasing).
    """
    img = natural(1000, 700, seed=3)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()  # 1, C, H, W
    for mode, bound in (("bicubic", 1), ("bilinear", 1)):
        ours = np.asarray(img.resize((365, 256), PIL_FILTERS[mode]), np.float32)
        theirs = F.interpolate(x, size=(256, 365), mode=mode, antialias=True, align_corners=False)
        theirs = theirs.round().clamp(0, 255)[0].permute(1, 2, 0).numpy()  # C, H, W -> H, W, C
        assert np.abs(ours - theirs).max() <= bound, mode
        aliased = F.interpolate(x, size=(256, 365), mode=mode, antialias=False, align_corners=False)
        aliased = aliased.round().clamp(0, 255)[0].permute(1, 2, 0).numpy()
        assert np.abs(ours - aliased).max() > 10 * bound  # why antialias matters
    small = natural(300, 200, seed=4)
    up = np.asarray(small.resize((384, 256), Image.Resampling.BICUBIC), np.float32)
    xs = torch.from_numpy(np.array(small)).permute(2, 0, 1)[None].float()
    t_up = F.interpolate(xs, size=(256, 384), mode="bicubic", antialias=True, align_corners=False)
    assert np.abs(up - t_up.round().clamp(0, 255)[0].permute(1, 2, 0).numpy()).max() <= 2


def test_extreme_aspect_ratio_resamples_only_the_crop(monkeypatch):
    p = make()
    for size in ((1, 30_000), (30_000, 1), (3, 29_999)):  # a full resize would be 2-6 GB
        out = p(Image.new("RGB", size, (10, 200, 30)))
        assert out.shape == (3, 224, 224)
        np.testing.assert_allclose(out[:, 0, 0], (np.array([10, 200, 30]) / 255 - IMAGENET["mean"])
                                   / IMAGENET["std"], atol=1e-5)
    img = natural(17, 400, seed=17)
    std = np.array(IMAGENET["std"], np.float32)[:, None, None]
    for interpolation, levels in (("bicubic", 2), ("bilinear", 1)):
        q = make(interpolation=interpolation)
        full = q(img)
        monkeypatch.setattr(pp, "FULL_RESIZE_MAX_PIXELS", 0)  # force the crop-only path
        boxed = q(img)
        monkeypatch.undo()
        # Pillow takes the box as float32: measured 2 levels bicubic, 1 bilinear
        assert np.abs(full - boxed).max() > 0
        assert (np.abs(full - boxed) * std * 255).max() <= levels + 1e-3


def test_batch_stacks_single_results_and_one_channel_models():
    p = make()
    imgs = [natural(300, 200, 1), natural(17, 400, 2), natural(240, 240, 3)]
    out = p.batch(imgs)
    assert out.shape == (3, 3, 224, 224) and out.dtype == np.float32 and out.flags.c_contiguous
    for i, img in enumerate(imgs):
        np.testing.assert_array_equal(out[i], p(img))
    assert p.batch([]).shape == (0, 3, 224, 224)
    gray = make((1, 32, 32), 1.0, mean=[0.5], std=[0.5])
    assert gray.mode == "L"
    one = gray(natural(64, 48))
    assert one.shape == (1, 32, 32) and np.isfinite(one).all() and one.min() >= -1 and one.max() <= 1


# ---------------------------------------------------------------- colour modes


def _modes(rgb: Image.Image) -> dict[str, Image.Image]:
    gray = rgb.convert("L")
    rgba = rgb.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    p_transp = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    p_transp.info["transparency"] = 0
    g16 = np.asarray(gray, np.uint16) * 257
    return {
        "L": gray, "LA": gray.convert("LA"), "1": rgb.convert("1"), "RGBA": rgba,
        "P": rgb.convert("P", palette=Image.Palette.ADAPTIVE), "P+transparency": p_transp,
        "P+bytes-transparency": Image.open(io.BytesIO(encode(rgba.convert("P"), "PNG"))),
        "CMYK": rgb.convert("CMYK"), "I;16": Image.fromarray(g16),
        "I": Image.fromarray(g16.astype(np.int32)),
        "F": Image.fromarray(np.asarray(gray, np.float32) / 255),
    }


@pytest.mark.parametrize("mode", ["L", "LA", "1", "RGBA", "P", "P+transparency", "P+bytes-transparency",
                                  "CMYK", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    rgb = natural(120, 90)
    img = _modes(rgb)[mode]
    loaded = load_image(img)
    assert loaded.mode == "RGB" and loaded.size == (120, 90)
    out = make()(img)
    assert out.shape == (3, 224, 224) and np.isfinite(out).all()
    pixels = np.asarray(loaded)
    if mode in ("L", "LA", "1", "I;16", "I", "F"):
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    if mode in ("I;16", "I", "F"):  # high bit depth scaled to 8 bits, not clipped to white
        np.testing.assert_array_equal(pixels[..., 0], np.asarray(rgb.convert("L")))
    if mode == "RGBA":  # timm's convert("RGB"): alpha dropped, colours kept
        np.testing.assert_array_equal(pixels, np.asarray(rgb))


def test_mode_files_round_trip_through_png_and_tiff(tmp_path):
    rgb = natural(64, 48)
    modes = _modes(rgb)
    for mode in ("L", "LA", "1", "RGBA", "P+transparency", "I;16"):
        path = tmp_path / f"{mode}.png"
        modes[mode].save(path)
        assert load_image(path).mode == "RGB"
    for mode in ("CMYK", "I", "F"):
        path = tmp_path / f"{mode}.tif"
        modes[mode].save(path)
        with Image.open(path) as stored:
            assert stored.mode == mode
        assert np.isfinite(make()(path)).all()


# ---------------------------------------------------------------- EXIF and formats


def test_exif_orientation_6_matches_the_manually_rotated_image():
    img = natural(80, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored pixels must be turned 90 degrees clockwise
    data = encode(img, "JPEG", quality=95, exif=exif.tobytes())
    decoded = Image.open(io.BytesIO(data)).convert("RGB")  # same JPEG decode, tag ignored
    rotated = decoded.transpose(Image.Transpose.ROTATE_270)  # 90 degrees clockwise
    loaded = load_image(data)
    assert loaded.size == (60, 80)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(rotated))
    p = make()
    np.testing.assert_array_equal(p(data), p(rotated))


@pytest.mark.parametrize("fmt,kw,lossless", [
    ("JPEG", {"quality": 95}, False), ("PNG", {}, True), ("WEBP", {"lossless": True}, True),
    ("BMP", {}, True), ("TIFF", {}, True),
])
def test_formats(tmp_path, fmt, kw, lossless):
    img = natural(96, 64)
    path = tmp_path / f"image.{fmt.lower()}"
    img.save(path, fmt, **kw)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (96, 64)
    with Image.open(path) as stored:
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(stored.convert("RGB")))
    if lossless:
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(img))
    assert make()(path).shape == (3, 224, 224)


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (40, 30), c) for c in ((200, 30, 30), (30, 30, 200), (30, 200, 30))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as stored:
        assert stored.n_frames == 3
    pixels = np.asarray(load_image(path), np.int16)
    np.testing.assert_allclose(pixels.reshape(-1, 3).mean(0), (200, 30, 30), atol=3)


def test_sources_bytes_fileobj_and_pil_give_the_same_array(tmp_path):
    img = natural(300, 200)
    path = tmp_path / "a.png"
    img.save(path)
    p = make()
    expected = p(img)
    with open(path, "rb") as f:
        np.testing.assert_array_equal(p(f), expected)
        assert not f.closed  # the caller's file stays the caller's
    np.testing.assert_array_equal(p(path.read_bytes()), expected)
    np.testing.assert_array_equal(p(str(path)), expected)


# ---------------------------------------------------------------- bad input


def png_header(width: int, height: int, bit_depth: int = 1, colour: int = 0) -> bytes:
    """A PNG claiming any size, with an empty image stream: a bomb's header for free."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, a word the error must contain)."""
    img = natural(200, 150)
    png, jpeg = encode(img, "PNG"), encode(img, "JPEG", quality=90)
    files = {
        "notes.txt": (b"hello, this is not an image\n", "not an image"),
        "empty.png": (b"", "empty"),
        "cut.png": (png[:len(png) // 2], "truncated"),
        "cut.jpg": (jpeg[:len(jpeg) // 2], "truncated"),
        "bomb.png": (png_header(50_000, 50_000), "decompression bomb"),
        "strip.png": (png_header(40_000, 1), "30000 px a side"),
    }
    out = {}
    for name, (data, word) in files.items():
        (tmp_path / name).write_bytes(data)
        out[name] = (tmp_path / name, word)
    (tmp_path / "folder.jpg").mkdir()
    out["folder.jpg"] = (tmp_path / "folder.jpg", "directory")
    out["missing.png"] = (tmp_path / "missing.png", "no such file")
    return out


@pytest.mark.parametrize("name", ["notes.txt", "empty.png", "cut.png", "cut.jpg", "bomb.png", "strip.png",
                                  "folder.jpg", "missing.png"])
def test_bad_input_raises_one_line_input_error_naming_the_file(tmp_path, name):
    path, word = _bad_files(tmp_path)[name]
    with pytest.raises(InputError) as e:
        load_image(path)
    message = str(e.value)
    assert str(path) in message and word in message and "\n" not in message, message


def test_bad_bytes_and_file_objects_are_named(tmp_path):
    with pytest.raises(InputError, match=r"^upload-7: not an image"):
        load_image(b"GIF89a but not really", name="upload-7")
    with pytest.raises(InputError, match=r"^<bytes>: empty"):
        load_image(b"")
    with open(tmp_path / "x.bin", "wb") as f:
        f.write(b"\x00" * 64)
    with open(tmp_path / "x.bin", "rb") as f, pytest.raises(InputError, match=r"x\.bin: not an image"):
        load_image(f)
    with pytest.raises(InputError, match="expected a path, bytes or a binary file object"):
        load_image(12345)


def test_pillow_bomb_limit_is_an_error_not_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    warn = tmp_path / "warn.png"  # 1600 pixels: over the limit, under twice it (a warning)
    natural(40, 40).save(warn)
    error = tmp_path / "error.png"  # 10000 pixels: over twice the limit (Pillow's error)
    natural(100, 100).save(error)
    for path in (warn, error):
        with pytest.raises(InputError, match=f"{path.name}: refused as a possible decompression bomb"):
            load_image(path)
    with pytest.raises(InputError, match="decompression bomb"):
        load_image(natural(40, 40))  # an already decoded image is held to the same limit


def test_megapixel_limit_applies_without_pillows_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(InputError, match=r"<bytes>: image is 12000x9000; the limit is 100 megapixels"):
        load_image(png_header(12_000, 9_000))


def test_preprocess_files_answers_the_good_ones_and_names_the_bad(tmp_path):
    bad = _bad_files(tmp_path)
    good = []
    for i, wh in enumerate([(300, 200), (17, 400), (240, 240)]):
        good.append(tmp_path / f"good{i}.png")
        natural(*wh, seed=i).save(good[-1])
    sources = [good[0], bad["cut.jpg"][0], good[1], bad["missing.png"][0], good[2]]
    p = make()
    result = preprocess_files(sources, p)
    assert isinstance(result, FileBatch)
    array, kept, errors = result
    assert array.shape == (3, 3, 224, 224) and kept == good
    for row, path in zip(array, good):
        np.testing.assert_array_equal(row, p(path))
    assert [src for src, _ in errors] == [bad["cut.jpg"][0], bad["missing.png"][0]]
    assert all(str(src) in msg for src, msg in errors)
    empty = preprocess_files([bad["notes.txt"][0]], p)
    assert empty.array.shape == (0, 3, 224, 224) and len(empty.errors) == 1


# ---------------------------------------------------------------- configuration


def test_from_dict_accepts_what_model_spec_writes():
    from crossvit.model.spec import Preprocessing

    d = Preprocessing(input_size=(3, 240, 240)).to_dict()
    p = Preprocessor.from_dict(d)
    assert p.to_dict() == d and p.input_size == (3, 240, 240)
    assert Preprocessor.from_dict({"input_size": [3, 224, 224]}).interpolation == "bicubic"


@pytest.mark.parametrize("change,word", [
    ({"crop_mode": "squash"}, "unknown preprocessing keys: crop_mode"),
    ({"input_size": None}, "input_size"),
    ({"input_size": [4, 224, 224]}, "4 channels"),
    ({"input_size": [3, 224]}, "input_size"),
    ({"input_size": [3, 224.5, 224]}, "input_size"),
    ({"crop_pct": 0}, "crop_pct"),
    ({"crop_pct": 1.5}, "crop_pct"),
    ({"crop_pct": "0.9"}, "crop_pct"),
    ({"interpolation": "lanczos"}, "interpolation"),
    ({"mean": [0.5, 0.5]}, "mean/std"),
    ({"std": [0.2, 0.0, 0.2]}, "mean/std"),
    ({"std": [0.2, float("nan"), 0.2]}, "std"),
])
def test_bad_preprocessing_dicts_are_refused_clearly(change, word):
    d = {"input_size": [3, 224, 224], "crop_pct": 0.875, "interpolation": "bicubic", **IMAGENET, **change}
    with pytest.raises(ConfigError, match=word):
        Preprocessor.from_dict(d)


@pytest.mark.parametrize("change,word", [
    ({"std": [1e308, 0.2, 0.2]}, r"std must be finite in float32"),  # float32(1e308) is inf: every pixel -> 0
    ({"mean": [1e300, 0.4, 0.4]}, r"mean must be finite in float32"),
    ({"std": [1e-50, 0.2, 0.2]}, r"std must be >= 1e-06 \(bounded away from 0\)"),
    ({"std": [1e-7, 0.2, 0.2]}, r"std must be >= 1e-06"),
    ({"mean": [3e38, 0.4, 0.4], "std": [1e-3, 0.2, 0.2]}, r"mean/std normalize pixels beyond float32"),
    ({"crop_pct": 1e-9}, r"crop_pct 1e-09 crops less than one pixel"),
])
def test_absurd_preprocessing_values_are_refused_naming_the_field(change, word):
    """Values that are numbers in range but give silent wrong answers (an inf std maps every image to
    the same input) or blame the user's image later ("infer got NaN")."""
    d = {"input_size": [3, 224, 224], "crop_pct": 0.875, "interpolation": "bicubic", **IMAGENET, **change}
    with pytest.raises(ConfigError, match=word):
        Preprocessor.from_dict(d)


def test_from_dict_needs_a_dict_with_input_size():
    with pytest.raises(ConfigError, match="must be a dict"):
        Preprocessor.from_dict([3, 224, 224])
    with pytest.raises(ConfigError, match="lacks input_size"):
        Preprocessor.from_dict({"crop_pct": 0.9})


# ---------------------------------------------------------------- the runtime stays torch-free


def test_module_source_imports_no_torch_nor_model_or_export():
    tree = ast.parse(MODULE.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
    banned = ("torch", "torchvision", "crossvit.model", "crossvit.export", "model", "export", "..")
    assert not [n for n in names if any(n == b or n.startswith(b + ".") or n.startswith("..") for b in banned)], names
    assert {"numpy", "PIL", "crossvit.errors"} <= {n.split(".")[0] if n != "crossvit.errors" else n for n in names}


def test_module_imports_with_torch_unavailable():
    code = ("import sys; sys.modules['torch'] = None; "
            "import crossvit.runtime.preprocess as m; "
            "p = m.Preprocessor.from_dict({'input_size': [3, 8, 8]}); "
            "from PIL import Image; print(p(Image.new('RGB', (10, 12))).shape)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "(3, 8, 8)"


@pytest.mark.parametrize("size, crop_pct", [(224, 0.875), (28, 0.875), (240, 1.0)])
def test_real_shipped_images_match_the_recipe_for_official_and_embedded_settings(size, crop_pct):
    """The shipped held-out PNGs (real scans), upscaled to 240/224 like an official variant's
    input and downscaled to 28: same values as the torch recipe."""
    from crossvit.assets import heldout_images as shipped_images
    from crossvit.runtime.images import list_images

    files = list_images(shipped_images()).files[::60]
    p = make((3, size, size), crop_pct, "bicubic")
    for f in files:
        ours = p(f)
        ref = torch_reference(Image.open(f), size, crop_pct, "bicubic").numpy()
        assert np.abs(ours - ref).max() <= 1e-6, f
