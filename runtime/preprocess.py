"""Image decoding and the eval transform, with numpy and Pillow only (no torch).

The runtime receives the model's preprocessing as a plain dict (`Preprocessing.to_dict()`
in model/spec.py, carried in ONNX metadata or the engine manifest) and turns image files
into the `(N, C, H, W)` float32 batch the model takes:

    load_image      decode, EXIF-rotate, convert to the model's mode ("RGB", or "L" if C == 1)
    Preprocessor    timm's eval transform: resize the shorter side to floor(H / crop_pct),
                    centre-crop (H, W), /255, normalize with mean/std
    preprocess_files  many files at once; a bad file is reported, the others still answered

Parity with timm / torchvision (what the model was evaluated with):
- timm's eval transform is `Resize(floor(size / crop_pct), interpolation)`,
  `CenterCrop(size)`, `ToTensor()`, `Normalize(mean, std)` on a PIL image. torchvision's
  `Resize` on a PIL image calls Pillow's own `Image.resize` (the output size computed as
  below), so on PIL input this module's resize is the *same* code as torchvision's, not an
  imitation of it. Pillow antialiases when it downscales (its filter support grows with
  the scale factor), in uint8 with an 8-bit rounding between the horizontal and vertical
  passes.
- Where they would differ: torchvision applied to a *tensor* resizes with
  `torch.nn.functional.interpolate`; with `antialias=True` it follows Pillow's algorithm in
  float (no intermediate rounding), so it differs from Pillow by a few 8-bit steps at most
  (measured in tests/test_preprocess.py); with `antialias=False` (the default before
  torchvision 0.17) a downscale aliases and differs a lot. Models evaluated through timm's
  data loader always saw PIL input, which is what we reproduce.
- Output sizes, as torchvision computes them: the shorter side becomes
  `S = floor(H / crop_pct)` and the longer `int(S * long / short)` (truncated, not rounded);
  the crop starts at `int(round((h - H) / 2))` (Python's round, half to even), exactly
  `torchvision.transforms.functional.center_crop`.
- Normalization is done in float32 as `(x / 255 - mean) / std`, the same operations in the
  same order as `ToTensor` + `Normalize`, so given the same resized pixels it matches torch
  to the last bit.
- Non-square input_size (H != W): timm scales both sides by one ratio so that the image
  covers `(floor(H / crop_pct), floor(W / crop_pct))` (its `ResizeKeepRatio`: ratio =
  min(h / sH, w / sW), sides rounded), then centre-crops (H, W). We follow that arithmetic
  but resize with the configured interpolation; timm's current eval transform builds that
  `ResizeKeepRatio` without passing `interpolation`, so it silently uses bilinear there.
  A square input_size (every CrossViT) takes timm's plain `Resize(int)` path above.
- One deliberate difference: a resize to more than `FULL_RESIZE_MAX_PIXELS` (only absurdly
  elongated images, e.g. 1 x 30000 px, would need gigabytes) samples only the cropped
  region; see `Preprocessor._resize`.

Colour modes (timm's loader does `Image.open(f).convert("RGB")`, and so do we):
- RGBA, LA, PA and P with transparency: alpha is *dropped*, not composited on white —
  that is what `convert("RGB")` does, so the colours under transparent pixels are what the
  model sees, as in training and in timm's eval.
- 1, L, P, CMYK, YCbCr, HSV and the rest go through Pillow's `convert` (CMYK naively, no
  ICC colour management, as timm). A grayscale image gives three equal channels.
- High bit depth, where `convert` would clip every value above 255 to white (timm's
  behaviour, which we deliberately do not copy): I;16 is scaled by 255/65535; I is taken as
  16-bit when it holds values above 255 (some decoders give 16-bit data as mode I), else as
  8-bit; F is taken as 0..1 when all values lie there, else as 0..255; NaN becomes 0.
- EXIF orientation is applied (`ImageOps.exif_transpose`); timm's loader does not, but a
  phone photo's pixels are stored sideways and the tag is how every viewer shows it.

Untrusted input: a decompression bomb (over Pillow's `Image.MAX_IMAGE_PIXELS`, its
`DecompressionBombWarning` turned into an error), an image over `MAX_PIXELS` or with a side
over `MAX_SIDE`, truncated data (the image is fully decoded with `load()`; we rely on
Pillow's default `ImageFile.LOAD_TRUNCATED_IMAGES = False`), EPS (decoding it runs
Ghostscript), and anything that is not an image each raise `InputError` with one line that
names the file. The warning filter is set with `warnings.catch_warnings`, which is
process-wide in Python < 3.14: concurrent decoding in threads can at worst leave
`DecompressionBombWarning` turned into an error for the whole process.
"""

from __future__ import annotations

import errno
import io
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, NamedTuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from crossvit.contract import IMAGENET_MEAN, IMAGENET_STD, MAX_IMAGE_SIDE, validate_preprocessing
from crossvit.errors import ConfigError, InputError

# Pillow's filters for our three names; the same mapping torchvision's InterpolationMode uses.
RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
MAX_PIXELS = 100_000_000  # beyond any photo a classifier needs; ~300 MB as RGB
MAX_SIDE = MAX_IMAGE_SIDE  # a 40000 x 1 strip has few pixels but is no photo either
FULL_RESIZE_MAX_PIXELS = 4_000_000  # larger resizes sample only the crop (see Preprocessor._resize)
REFUSED_FORMATS = frozenset({"EPS"})  # Pillow decodes EPS by running Ghostscript

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]


# ---------------------------------------------------------------- decoding


def _source_name(source: object, name: str | None) -> str:
    """The label every error message starts with."""
    if name is not None:
        return str(name)
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(source, Image.Image):
        return "<image>"
    return str(getattr(source, "name", None) or "<file object>")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _check_size(width: int, height: int, label: str) -> None:
    """Refuse images too large to decode before any pixel is decoded (the header gives size)."""
    bomb = Image.MAX_IMAGE_PIXELS
    if width < 1 or height < 1:
        raise InputError(f"{label}: image has no pixels ({width}x{height})")
    if max(width, height) > MAX_SIDE or width * height > MAX_PIXELS:
        raise InputError(f"{label}: image is {width}x{height}; the limit is {MAX_PIXELS // 1_000_000} "
                         f"megapixels and {MAX_SIDE} px a side")
    if bomb is not None and width * height > bomb:
        raise InputError(f"{label}: refused as a possible decompression bomb: {width}x{height} = "
                         f"{width * height} pixels is over Image.MAX_IMAGE_PIXELS = {bomb}")


def _high_bit_to_l(img: Image.Image) -> Image.Image:
    """I;16 / I / F to 8-bit L without clipping everything above 255 to white (see module doc)."""
    if img.mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.float32) * np.float32(255 / 65535)
    elif img.mode == "I":
        arr = np.asarray(img).astype(np.float32)
        if arr.size and arr.max() > 255:
            arr = np.clip(arr, 0, 65535) * np.float32(255 / 65535)
    else:  # F
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.min() >= 0 and arr.max() <= 1:
            arr = arr * np.float32(255)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_mode(img: Image.Image, mode: str = "RGB") -> Image.Image:
    """Convert a decoded image to "RGB" or "L" as timm's loader does (`img.convert(mode)`).

    Returns a new image unless `img` is already in `mode`.
    """
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _high_bit_to_l(img)
    elif img.mode == "La":  # premultiplied alpha: Pillow converts it only via LA
        img = img.convert("LA")
    elif img.mode == "P" and "transparency" in img.info:
        # Same colours as convert("RGB"), without Pillow's warning about byte transparency.
        img = img.convert("RGBA")
    if img.mode == mode:
        return img
    try:
        return img.convert(mode)
    except ValueError:  # e.g. LAB -> L: Pillow has no direct path, RGB is the common one
        return img.convert("RGB").convert(mode)


def _open(source: ImageSource, label: str) -> tuple[BinaryIO, bool]:
    """A binary file object for `source` and whether we must close it; clear errors for paths."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise InputError(f"{label}: empty data, not an image")
        return io.BytesIO(source), True
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            raise InputError(f"{label}: is a directory, not an image file")
        if os.path.exists(path) and not os.path.isfile(path):  # opening a FIFO would wait for a writer
            raise InputError(f"{label}: is not a regular file (a pipe, socket or device), not an image file")
        try:
            fp = open(path, "rb")
        except FileNotFoundError:
            raise InputError(f"{label}: no such file") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise InputError(f"{label}: is a symlink loop, not an image file") from None
            raise InputError(f"{label}: cannot open ({_one_line(e)})") from None
        if os.fstat(fp.fileno()).st_size == 0:
            fp.close()
            raise InputError(f"{label}: empty file, not an image")
        return fp, True
    if hasattr(source, "read"):
        return source, False  # type: ignore[return-value]
    raise InputError(f"{label}: expected a path, bytes or a binary file object, "
                     f"got {type(source).__name__}")


def load_image(source: ImageSource, *, mode: str = "RGB", name: str | None = None) -> Image.Image:
    """Decode one image fully, apply its EXIF orientation and convert it to `mode`.

    Args:
        source: a path, the file's bytes, a binary file object, or an already opened
            PIL image (then only orientation and mode are handled).
        mode: "RGB" for a 3-channel model, "L" for a 1-channel one.
        name: how errors name the image (default: the path, or the file object's name).

    Raises:
        InputError: one line naming the image and what is wrong with it.
    """
    if mode not in ("RGB", "L"):
        raise ConfigError(f"load_image mode must be 'RGB' or 'L', got {mode!r}")
    label = _source_name(source, name)
    if isinstance(source, Image.Image):
        _check_size(*source.size, label)
        try:
            return to_mode(ImageOps.exif_transpose(source), mode)
        except Exception as e:
            raise InputError(f"{label}: cannot convert {source.mode} image to {mode} "
                             f"({_one_line(e)})") from None
    fp, owned = _open(source, label)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(fp, mode, label)
    finally:
        if owned:
            fp.close()


def _decode(fp: BinaryIO, mode: str, label: str) -> Image.Image:
    try:
        img = Image.open(fp)
    except UnidentifiedImageError:
        raise InputError(f"{label}: not an image (no format Pillow reads recognises it)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{label}: refused as a possible decompression bomb ({_one_line(e)})") from None
    except Exception as e:  # plugins raise SyntaxError, struct.error, ... on a corrupt header
        raise InputError(f"{label}: corrupt image header ({_one_line(e)})") from None
    fmt = img.format or "image"
    if fmt in REFUSED_FORMATS:
        raise InputError(f"{label}: {fmt} files are refused (decoding them runs Ghostscript)")
    _check_size(*img.size, label)
    try:
        img.load()  # decode every pixel now: truncated data fails here, not later
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{label}: refused as a possible decompression bomb ({_one_line(e)})") from None
    except Exception as e:
        what = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise InputError(f"{label}: {what} {fmt} data ({_one_line(e)})") from None
    try:
        ImageOps.exif_transpose(img, in_place=True)  # the image is ours: no copy of the pixels
        return to_mode(img, mode)
    except Exception as e:
        raise InputError(f"{label}: cannot convert {fmt} {img.mode} image to {mode} "
                         f"({_one_line(e)})") from None


# ---------------------------------------------------------------- the eval transform


@dataclass(frozen=True)
class Preprocessor:
    """timm's eval transform on PIL images: resize shorter side, centre-crop, normalize.

    Same fields and meaning as `model.spec.Preprocessing` (which the runtime may not import).
    """

    input_size: tuple[int, int, int]  # C, H, W of the tensor the model takes
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    # float32 (C, 1, 1) copies of mean/std, broadcast over a (C, H, W) image
    _mean: np.ndarray = field(init=False, repr=False, compare=False)
    _std: np.ndarray = field(init=False, repr=False, compare=False)

    @staticmethod
    def _check_channels(size: object) -> None:
        """Images decode to 1 (L) or 3 (RGB) channels; said before the mean/std length check."""
        if isinstance(size, Sequence) and len(size) == 3 and isinstance(size[0], int) and size[0] not in (1, 3):
            raise ConfigError(f"preprocessing input_size has {size[0]} channels; images give 1 (L) or 3 (RGB)")

    def __post_init__(self) -> None:
        self._check_channels(self.input_size)
        # the contract's validation, the same the model package applies when it writes the dict
        checked = validate_preprocessing({"input_size": self.input_size, "crop_pct": self.crop_pct,
                                          "interpolation": self.interpolation, "mean": self.mean,
                                          "std": self.std})
        c, h, w = checked["input_size"]
        mean, std = tuple(checked["mean"]), tuple(checked["std"])
        for key, value in (("input_size", (c, h, w)), ("crop_pct", checked["crop_pct"]), ("mean", mean),
                           ("std", std), ("_mean", np.array(mean, np.float32).reshape(c, 1, 1)),
                           ("_std", np.array(std, np.float32).reshape(c, 1, 1))):
            object.__setattr__(self, key, value)

    @classmethod
    def from_dict(cls, values: Mapping) -> "Preprocessor":
        """Build from the preprocessing dict in an artifact's metadata (checked by the contract)."""
        if isinstance(values, Mapping):
            cls._check_channels(values.get("input_size"))
        return cls(**validate_preprocessing(values))

    def to_dict(self) -> dict:
        return {"input_size": list(self.input_size), "crop_pct": self.crop_pct,
                "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std)}

    @property
    def mode(self) -> str:
        """The PIL mode images are converted to: "RGB", or "L" for a 1-channel model."""
        return "RGB" if self.input_size[0] == 3 else "L"

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return self.input_size

    def resize_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the resized image, as timm + torchvision compute it."""
        _, crop_h, crop_w = self.input_size
        scale_h = math.floor(crop_h / self.crop_pct)
        scale_w = math.floor(crop_w / self.crop_pct)
        if scale_h == scale_w:
            # torchvision Resize(int): the shorter side becomes S, the longer is truncated
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = scale_h, int(scale_h * long / short)
            return (new_short, new_long) if width <= height else (new_long, new_short)
        # timm ResizeKeepRatio(longest=0): one ratio so the image covers (scale_h, scale_w)
        ratio = min(height / scale_h, width / scale_w)
        return round(width / ratio), round(height / ratio)

    def crop_box(self, width: int, height: int) -> tuple[int, int]:
        """(top, left) of torchvision's centre crop of a width x height image."""
        _, crop_h, crop_w = self.input_size
        return int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))

    def load(self, source: ImageSource, *, name: str | None = None) -> Image.Image:
        """`load_image` in this model's mode."""
        return load_image(source, mode=self.mode, name=name)

    def _resize(self, image: Image.Image) -> tuple[Image.Image, int, int]:
        """Resize as timm does; returns the image and the (top, left) of the centre crop in it.

        The crop cannot fall outside: the resized image covers floor(side / crop_pct) >= side.
        A very elongated image (1 x 30000 px) would resize to gigabytes of which the crop keeps
        a sliver; past `FULL_RESIZE_MAX_PIXELS` (far beyond any photo's resize, e.g. a 1:60
        strip) only the cropped region is resampled, with Pillow's `box`. Same filter, but
        Pillow takes the box as float32, which moves the filter centres slightly: up to 2
        8-bit levels (bicubic; 1 bilinear) from a full resize then crop, measured in the tests.
        """
        _, crop_h, crop_w = self.input_size
        width, height = image.size
        new_w, new_h = self.resize_size(width, height)
        top, left = self.crop_box(new_w, new_h)
        resample = RESAMPLE[self.interpolation]
        if (new_w, new_h) == (width, height):  # torchvision returns the image unchanged too
            return image, top, left
        if new_w * new_h <= FULL_RESIZE_MAX_PIXELS:
            return image.resize((new_w, new_h), resample), top, left
        sx, sy = width / new_w, height / new_h  # source pixels per resized pixel
        box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
        return image.resize((crop_w, crop_h), resample, box=box), 0, 0

    def _into(self, image: ImageSource, out: np.ndarray) -> None:
        """Preprocess one image into `out` (C, H, W) float32, without temporaries beyond uint8."""
        if isinstance(image, Image.Image):
            image = to_mode(image, self.mode)  # the caller decoded it: no EXIF rotation here
        else:
            image = self.load(image)
        image, top, left = self._resize(image)
        _, crop_h, crop_w = self.input_size
        pixels = np.asarray(image)  # H', W', C uint8 (H', W' for mode L)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]  # H', W' -> H', W', 1
        crop = pixels[top:top + crop_h, left:left + crop_w].transpose(2, 0, 1)  # -> C, H, W view
        # ToTensor + Normalize, same float32 operations in the same order.
        np.divide(crop, np.float32(255), out=out, dtype=np.float32)
        out -= self._mean
        out /= self._std

    def __call__(self, image: ImageSource) -> np.ndarray:
        """One image -> (C, H, W) float32.

        A path, bytes or file object goes through `load_image` (limits, EXIF orientation,
        mode); a PIL image is taken as the caller decoded it and only converted to `mode`.
        """
        out = np.empty(self.input_size, np.float32)
        self._into(image, out)
        return out

    def batch(self, images: Sequence[ImageSource]) -> np.ndarray:
        """Several images -> (N, C, H, W) float32; raises InputError at the first bad one."""
        images = list(images)
        out = np.empty((len(images), *self.input_size), np.float32)
        for i, image in enumerate(images):
            self._into(image, out[i])
        return out


# ---------------------------------------------------------------- many files


class FileBatch(NamedTuple):
    """What `preprocess_files` returns: unpacks as `array, sources, errors`."""

    array: np.ndarray  # (N_good, C, H, W) float32, rows in input order
    sources: list  # the source of each row of `array`
    errors: list[tuple[object, str]]  # (source, one-line message) for each bad input


def preprocess_files(sources: Iterable[ImageSource], preprocessor: Preprocessor) -> FileBatch:
    """Decode and preprocess many images; a bad one is reported and the others still answered."""
    sources = list(sources)
    out = np.empty((len(sources), *preprocessor.input_size), np.float32)
    good: list = []
    errors: list[tuple[object, str]] = []
    for source in sources:
        try:
            preprocessor._into(source, out[len(good)])
        except InputError as e:
            errors.append((source, str(e)))
        else:
            good.append(source)
    return FileBatch(out[:len(good)], good, errors)
