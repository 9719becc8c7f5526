"""Train the embedded default model `crossvit_digits` (a small seed CrossViT) on scikit-learn's digits.

Run from the repository root (needs scikit-learn, a dev dependency; not needed at run time):

    .venv/bin/python scripts/train_default.py

It is deterministic (fixed seeds, deterministic algorithms, 2 CPU threads) and takes about
2-3 minutes on 2 quiet CPU cores. It prints the loss and held-out accuracy per epoch, and writes:

- crossvit/assets/crossvit_digits.safetensors: the trained weights with their metadata
  (config, labels, preprocessing, provenance), via `crossvit.model.save_checkpoint`;
- crossvit/assets/heldout/NNNN_dD.png (32x32 RGB) and crossvit/assets/heldout/labels.csv
  (`file,label`): the stratified 20% held-out split, regenerated from scratch.

The model's config is the `crossvit_digits` entry of model/registry.py (single source of truth).
Finally it reloads the checkpoint with `crossvit.model.load_checkpoint`, reads the PNG files back
and prints the held-out top-1 accuracy measured that way.

Image pipeline (the same for training and the shipped PNGs): 8x8 digit (0..16) -> uint8
(value*255/16, rounded) -> PIL grayscale -> resize to 32x32 (bicubic) -> RGB. The model input is
that image as float/255, normalized with mean 0.5 and std 0.5 per channel, matching the spec's
preprocessing. Training alone adds small random affine jitter (rotation, scale, translation).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Sleep rather than spin while waiting for the other OpenMP thread: on a shared 2-core machine
# spinning makes epochs up to 10x slower when another process holds a core (results unchanged).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from crossvit.arguments import int_at_least  # noqa: E402
from crossvit.errors import CrossViTError  # noqa: E402
from crossvit.files import check_output_dir, check_output_path, first_line  # noqa: E402
from crossvit.model import CrossViT, load_checkpoint, save_checkpoint  # noqa: E402
from crossvit.model.registry import get_spec  # noqa: E402

# This script regenerates the shipped files in the checkout (not in an installed package).
ASSETS = Path(__file__).resolve().parent.parent / "crossvit" / "assets"

NAME = "crossvit_digits"
SEED = 0
SPLIT_SEED = 0
TEST_SIZE = 0.2
EPOCHS = 40
BATCH_SIZE = 64
LR = 2e-3
WEIGHT_DECAY = 0.05
WARMUP_EPOCHS = 3
LABEL_SMOOTHING = 0.1
MEAN, STD = 0.5, 0.5
SIZE = 32


def digits_to_rgb(images: np.ndarray) -> np.ndarray:
    """(N, 8, 8) values 0..16 -> (N, 32, 32, 3) uint8 RGB, the shipped image pipeline."""
    out = np.empty((len(images), SIZE, SIZE, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        u8 = np.rint(np.asarray(img, dtype=np.float64) * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
        pil = Image.fromarray(u8, mode="L").resize((SIZE, SIZE), Image.BICUBIC).convert("RGB")
        out[i] = np.asarray(pil)
    return out


def to_unit_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float().div(255.0).contiguous()


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random small affine jitter of [0, 1] images (background stays black)."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(10)
    scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 * 2.5 / SIZE)  # up to 2.5 px
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(normalize(x[i:i + 256])).argmax(1) for i in range(0, len(x), 256)])
    return (pred == y).float().mean().item()


def write_heldout(folder: Path, rgb: np.ndarray, labels: np.ndarray) -> None:
    """Regenerate `folder` from scratch: write into a temp folder, then swap it in."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        rows = []
        for i, (img, label) in enumerate(zip(rgb, labels)):
            fname = f"{i:04d}_d{int(label)}.png"
            Image.fromarray(img, mode="RGB").save(tmp / fname)
            rows.append((fname, str(int(label))))
        with open(tmp / "labels.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["file", "label"])
            w.writerows(rows)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; make it like any other folder
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_heldout(folder: Path, class_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the PNGs back from disk as normalized tensors, labels as class indices."""
    with open(folder / "labels.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    imgs = np.stack([np.asarray(Image.open(folder / r["file"]).convert("RGB")) for r in rows])
    y = torch.tensor([class_names.index(r["label"]) for r in rows])
    return normalize(to_unit_tensor(imgs)), y


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int_at_least(1), default=EPOCHS)
    parser.add_argument("--out", type=Path, default=ASSETS / f"{NAME}.safetensors")
    parser.add_argument("--heldout-dir", type=Path, default=ASSETS / "heldout")
    args = parser.parse_args(argv)
    try:  # both outputs can be written, before any is: a run must not leave one updated and not the other
        check_output_path(args.out)
        check_output_dir(args.heldout_dir)
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except (CrossViTError, ImportError) as e:
        print(f"train_default: error: {first_line(e) if isinstance(e, CrossViTError) else f'needs scikit-learn ({e})'}",
              file=sys.stderr)
        return 1

    t0 = time.perf_counter()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)

    digits = load_digits()
    rgb = digits_to_rgb(digits.images)
    labels = digits.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=TEST_SIZE,
                                           stratify=labels, random_state=SPLIT_SEED)
    x_train, y_train = to_unit_tensor(rgb[idx_train]), torch.from_numpy(labels[idx_train])
    x_test, y_test = normalize(to_unit_tensor(rgb[idx_test])), torch.from_numpy(labels[idx_test])
    print(f"digits: {len(labels)} images, train {len(idx_train)}, held-out {len(idx_test)}", flush=True)

    spec = get_spec(NAME)
    model = CrossViT(**spec.config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters ({n_params * 4 / 1e6:.2f} MB float32)", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n
             and "cls_token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n
                                                               and "cls_token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR)
    steps_per_epoch = math.ceil(len(x_train) / BATCH_SIZE)
    total, warmup = args.epochs * steps_per_epoch, WARMUP_EPOCHS * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warmup:
            return LR * (step + 1) / warmup
        return LR * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    gen = torch.Generator().manual_seed(SEED)
    step = 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        te = time.perf_counter()
        perm = torch.randperm(len(x_train), generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(perm), BATCH_SIZE):
            b = perm[i:i + BATCH_SIZE]
            xb, yb = normalize(augment(x_train[b], gen)), y_train[b]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=LABEL_SMOOTHING)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss_sum += loss.item() * len(b)
            correct += (logits.argmax(1) == yb).sum().item()
        acc = accuracy(model, x_test, y_test)
        print(f"epoch {epoch:3d}/{args.epochs}  loss {loss_sum / len(perm):.4f}  "
              f"train acc {correct / len(perm):.4f}  held-out acc {acc:.4f}  "
              f"({time.perf_counter() - te:.1f}s)", flush=True)

    model.eval()
    final_acc = accuracy(model, x_test, y_test)
    train_s = time.perf_counter() - t0
    write_heldout(args.heldout_dir, rgb[idx_test], labels[idx_test])
    save_checkpoint(model, args.out, name=NAME, provenance={
        "dataset": "scikit-learn load_digits (1797 8x8 images, 10 classes), upscaled to 32x32 "
                   "bicubic RGB",
        "split": f"sklearn train_test_split(test_size={TEST_SIZE}, stratify=y, "
                 f"random_state={SPLIT_SEED}): {len(idx_train)} train / {len(idx_test)} held-out",
        "epochs": args.epochs, "batch_size": BATCH_SIZE, "optimizer": f"AdamW lr={LR} "
        f"wd={WEIGHT_DECAY}, {WARMUP_EPOCHS} warmup epochs + cosine, label smoothing "
        f"{LABEL_SMOOTHING}, random affine jitter", "seed": SEED,
        "heldout_accuracy": round(final_acc, 6), "heldout_count": len(idx_test),
        "script": "scripts/train_default.py",
    })

    umask = os.umask(0)
    os.umask(umask)
    os.chmod(args.out, 0o666 & ~umask)  # the atomic write leaves a 0600 temp file's mode
    # Check the shipped artefacts the way a user would see them.
    loaded = load_checkpoint(args.out)
    x_disk, y_disk = read_heldout(args.heldout_dir, loaded.info.labels)
    disk_acc = accuracy(loaded.model, x_disk, y_disk)
    size = os.path.getsize(args.out)
    print(f"wrote {args.out} ({size / 1e6:.3f} MB) and {len(y_disk)} held-out images in "
          f"{args.heldout_dir}")
    print(f"held-out accuracy (checkpoint + PNGs from disk): {disk_acc:.4f} "
          f"({round(disk_acc * len(y_disk))}/{len(y_disk)}); total time {time.perf_counter() - t0:.1f}s "
          f"(training {train_s:.1f}s)")
    if abs(disk_acc - final_acc) > 1e-9:
        print(f"error: accuracy from disk {disk_acc} differs from in-memory {final_acc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
