"""The official CrossViT family: IBM's release as ported to timm (`timm/models/crossvit.py`).

CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification
(Chen, Fan, Panda; ICCV 2021, https://arxiv.org/abs/2103.14899), in the form IBM released it
(https://github.com/IBM/CrossViT) and timm ships it: two branches see the image at two scales
(the second one resized, e.g. 240 -> 224) cut into small and large patches; in each multi-scale
block, each branch runs its transformer blocks, then its CLS token is projected to the other
branch's width (f), attends to that branch's patch tokens (cross-attention, query = CLS only),
and is projected back (g); each branch ends with its own norm and linear head; the two heads'
logits are averaged.

Compatibility contract: `OfficialConfig` has timm's `CrossVit` constructor arguments with the
same names and defaults, and `state_dict()` has exactly timm's keys and shapes, so a timm
checkpoint loads with `strict=True` and computes the same logits (tests/test_official.py checks
this against fixtures made by the real timm, scripts/make_timm_fixtures.py). IBM's own release
names a few parameters differently; `checkpoint_filter_fn` maps them.

Deployment changes (same function, different code): attention goes through
`F.scaled_dot_product_attention`; the second branch's bicubic resize is two matrix products
(`BicubicResize`); the number of branches is fixed at two (as timm's forward hard-codes), so
`forward` has no shape-dependent Python branches and torch.export sees one graph for every
batch size. The ONNX export (and only it: `model.fold.folded_cross_attention`) computes the CLS-only
cross-attention without projecting every token to keys and values (`CrossAttention`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from crossvit.errors import ConfigError

from .spec import ModelSpec, Preprocessing, dataclass_from_dict

LAYER_NORM_EPS = 1e-6  # timm's CrossVit uses partial(nn.LayerNorm, eps=1e-6) everywhere
NUM_BRANCHES = 2  # timm's forward hard-codes cls_token_0/1 and pos_embed_0/1
# (stride, padding) of the second and third convs of timm's three-conv "dagger" stem, by patch
# size: the only patch sizes that stem is defined for.
DAGGER_STEMS = {12: ((3, 0), (1, 1)), 16: ((2, 1), (2, 1))}
DAGGER_PATCH_SIZES = tuple(DAGGER_STEMS)


def _pair(value) -> tuple:
    """timm's `to_2tuple`: a scalar means the same value for both entries."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value, value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class OfficialConfig:
    """timm `CrossVit` arguments, same names and defaults (so a timm config maps 1:1).

    Per-branch tuples hold (small-patch branch, large-patch branch).
    """

    img_size: tuple[int, int] = (224, 224)  # (H, W) of the input image (timm's img_size, an int or pair)
    img_scale: tuple[float, float] = (1.0, 1.0)  # branch i sees int(img_size * img_scale[i])
    patch_size: tuple[int, int] = (8, 16)
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: tuple[int, int] = (192, 384)
    # per multi-scale block: (small-branch blocks, large-branch blocks, cross-attention blocks);
    # a cross depth of 0 means one un-nested cross-attention block (IBM's released models use it)
    depth: tuple[tuple[int, int, int], ...] = ((1, 3, 1), (1, 3, 1), (1, 3, 1))
    num_heads: tuple[int, int] = (6, 12)
    mlp_ratio: tuple[float, ...] = (2.0, 2.0, 4.0)  # per branch; timm's third entry is unused
    multi_conv: bool = False  # the "dagger" three-conv patch embedding instead of one conv
    crop_scale: bool = False  # centre-crop instead of resize where a branch is smaller
    qkv_bias: bool = True
    global_pool: str = "token"  # "token" (CLS) or "avg" (mean of patch tokens)
    drop_rate: float = 0.0  # training only (head dropout); eval/export is deterministic
    pos_drop_rate: float = 0.0  # training only
    proj_drop_rate: float = 0.0  # training only
    attn_drop_rate: float = 0.0  # training only
    drop_path_rate: float = 0.0  # training only (stochastic depth)

    def __post_init__(self) -> None:
        # normalize what JSON and timm users write (ints for pairs, lists for tuples)
        norm = {
            "img_size": _pair(self.img_size),
            "img_scale": _pair(self.img_scale),
            "patch_size": _pair(self.patch_size),
            "embed_dim": _pair(self.embed_dim),
            "num_heads": _pair(self.num_heads),
            "mlp_ratio": _pair(self.mlp_ratio),
            "depth": tuple(tuple(d) if isinstance(d, (list, tuple)) else d for d in self.depth)
            if isinstance(self.depth, (list, tuple)) else self.depth,
        }
        for name, value in norm.items():
            object.__setattr__(self, name, value)
        problems = self._problems()
        if problems:
            raise ConfigError("invalid official CrossViT config: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        for name in ("img_size", "patch_size", "embed_dim", "num_heads"):
            value = getattr(self, name)
            if len(value) != NUM_BRANCHES or not all(_is_int(v) and v > 0 for v in value):
                problems.append(f"{name}={value!r} must be {NUM_BRANCHES} positive integers")
        if len(self.img_scale) != NUM_BRANCHES or not all(_is_number(v) and v > 0 for v in self.img_scale):
            problems.append(f"img_scale={self.img_scale!r} must be {NUM_BRANCHES} positive numbers")
        if len(self.mlp_ratio) not in (NUM_BRANCHES, NUM_BRANCHES + 1) or not all(
                _is_number(v) and v > 0 for v in self.mlp_ratio):
            problems.append(f"mlp_ratio={self.mlp_ratio!r} must be {NUM_BRANCHES} or {NUM_BRANCHES + 1} "
                            "positive numbers")
        if (not isinstance(self.depth, tuple) or not self.depth
                or not all(isinstance(d, tuple) and len(d) == NUM_BRANCHES + 1 and all(_is_int(v) for v in d)
                           for d in self.depth)):
            problems.append(f"depth={self.depth!r} must be a non-empty list of "
                            "[small_depth, large_depth, cross_depth] integer triples")
        elif not all(min(d[:NUM_BRANCHES]) >= 1 and d[-1] >= 0 for d in self.depth):
            problems.append(f"depth={self.depth!r}: every stage needs >= 1 block per branch and "
                            ">= 0 cross-attention blocks")
        for name in ("in_chans", "num_classes"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                problems.append(f"{name}={value!r} must be a positive integer")
        for name in ("multi_conv", "crop_scale", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r} must be true or false")
        if self.global_pool not in ("token", "avg"):
            problems.append(f"global_pool={self.global_pool!r} must be 'token' or 'avg'")
        for name in ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                problems.append(f"{name}={value!r} must be in [0, 1)")
        if problems:
            return problems  # the checks below need well-formed values
        for i, (dim, heads) in enumerate(zip(self.embed_dim, self.num_heads)):
            if dim % heads:
                problems.append(f"embed_dim[{i}]={dim} is not divisible by num_heads[{i}]={heads}")
        for i, (size, patch) in enumerate(zip(self.branch_sizes, self.patch_size)):
            if size[0] % patch or size[1] % patch:
                problems.append(f"branch {i} image size {size[0]}x{size[1]} (img_size={self.img_size} x "
                                f"img_scale[{i}]={self.img_scale[i]}) is not divisible by "
                                f"patch_size[{i}]={patch}")
        if self.multi_conv and any(p not in DAGGER_PATCH_SIZES for p in self.patch_size):
            problems.append(f"multi_conv=True needs patch_size in {DAGGER_PATCH_SIZES}, "
                            f"got {self.patch_size}")
        return problems

    @property
    def branch_sizes(self) -> tuple[tuple[int, int], ...]:
        """(H, W) each branch sees; truncated exactly as timm's `img_size_scaled`."""
        return tuple(tuple(int(s * scale) for s in self.img_size) for scale in self.img_scale)

    @classmethod
    def from_dict(cls, values: dict) -> "OfficialConfig":
        """Build from a plain dict (a checkpoint's or a user's JSON), naming unknown keys."""
        return dataclass_from_dict(cls, values, "official CrossViT config")

    def to_dict(self) -> dict:
        """JSON-ready: tuples become lists."""
        def plain(v):
            return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


# ---------------------------------------------------------------------------------------------
# The branch resize


def bicubic_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, in_size) matrix M with `M @ v` == 1-D bicubic resize of v (PyTorch semantics).

    Built by resizing an identity with `F.interpolate(mode="bicubic", align_corners=False)` along
    one axis (the other axis keeps size 1, whose weights are exactly (0, 1, 0, 0)), so border
    clamping and the a=-0.75 kernel are PyTorch's own. Computed in float32 on purpose: PyTorch's
    float32 kernel computes source coordinates in float32 and differs from exact (float64)
    weights by up to 1e-4 at 240 -> 224; timm runs in float32, so these weights match it to ~1e-6.
    """
    eye = torch.eye(in_size, dtype=torch.float32).reshape(in_size, 1, in_size, 1)  # batch = unit vectors
    cols = F.interpolate(eye, size=(out_size, 1), mode="bicubic", align_corners=False)  # in, 1, out, 1
    return cols.reshape(in_size, out_size).t().contiguous()  # out, in


class BicubicResize(nn.Module):
    """`F.interpolate(x, size, mode="bicubic", align_corners=False)` as `A @ x @ Bᵀ`.

    timm's `scale_image` resizes the second branch's input bicubically (240 -> 224). Exported as
    ONNX `Resize(mode="cubic")` that op is slow in ONNX Runtime (about half of crossvit_tiny's CPU
    time) and has known mismatches in TensorRT. Bicubic resize (no antialias, as timm calls it)
    is separable and linear, so it is exactly two fixed matrices: rows `A` (out_h, in_h), columns
    `B` (out_w, in_w), built once here. They are non-persistent buffers: derived from the config,
    not in the state_dict, so timm checkpoints load strictly.
    """

    def __init__(self, in_size: tuple[int, int], out_size: tuple[int, int]):
        super().__init__()
        self.in_size, self.out_size = tuple(in_size), tuple(out_size)
        self.register_buffer("rows", bicubic_matrix(in_size[0], out_size[0]), persistent=False)
        self.register_buffer("cols_t", bicubic_matrix(in_size[1], out_size[1]).t().contiguous(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # along W first, then H: PyTorch's own order, the closest float32 match
        x = torch.matmul(x, self.cols_t)  # (B, C, H, W) @ (W, w') -> B, C, H, w'
        return torch.matmul(self.rows, x)  # (h', H) @ (B, C, H, w') -> B, C, h', w'

    def extra_repr(self) -> str:
        return f"{self.in_size} -> {self.out_size}"


class CenterCrop(nn.Module):
    """timm's `crop_scale` path: a fixed centre crop (a static slice, exact; no matrices needed)."""

    def __init__(self, in_size: tuple[int, int], out_size: tuple[int, int]):
        super().__init__()
        # Python's round (half to even), exactly as timm's scale_image computes the offsets
        self.top = int(round((in_size[0] - out_size[0]) / 2.0))
        self.left = int(round((in_size[1] - out_size[1]) / 2.0))
        self.out_size = tuple(out_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.out_size
        return x[:, :, self.top:self.top + h, self.left:self.left + w]  # B, C, h, w

    def extra_repr(self) -> str:
        return f"top={self.top}, left={self.left}, size={self.out_size}"


def branch_resize(in_size: tuple[int, int], out_size: tuple[int, int], crop_scale: bool) -> nn.Module:
    """The module for timm's `scale_image(x, out_size, crop_scale)`, chosen once from the config.

    timm decides per call from the input's shape; the input shape is fixed by the config here, so
    the decision is made at construction and `forward` has no shape-dependent branch.
    """
    if tuple(in_size) == tuple(out_size):
        return nn.Identity()
    if crop_scale and out_size[0] <= in_size[0] and out_size[1] <= in_size[1]:
        return CenterCrop(in_size, out_size)
    return BicubicResize(in_size, out_size)


# ---------------------------------------------------------------------------------------------
# Blocks (module and attribute names are timm's: they are the state_dict keys)


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LAYER_NORM_EPS)


class DropPath(nn.Module):
    """Stochastic depth per sample (training only); identity in eval."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # B, 1, 1
        return x * mask / keep


class PatchEmbed(nn.Module):
    """Image to patch tokens: one strided conv, or timm's three-conv "dagger" stem (multi_conv)."""

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int, multi_conv: bool):
        super().__init__()
        if multi_conv:  # 7x7/4 conv, then two 3x3 convs whose strides make up the patch size
            (s2, p2), (s3, p3) = DAGGER_STEMS[patch_size]
            self.proj = nn.Sequential(
                nn.Conv2d(in_chans, embed_dim // 4, kernel_size=7, stride=4, padding=3),
                nn.ReLU(inplace=True),
                nn.Conv2d(embed_dim // 4, embed_dim // 2, kernel_size=3, stride=s2, padding=p2),
                nn.ReLU(inplace=True),
                nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=s3, padding=p3),
            )
        else:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # B, D, h, w -> B, D, N -> B, N, D


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)  # B, N, C -> B, N, H, C/H -> B, H, N, C/H


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).flatten(2)  # B, H, N, C/H -> B, N, H, C/H -> B, N, C


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's `Attention`)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1))  # B, N, 3C -> B, N, 3, H, C/H
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, C/H)
        # SDPA's default scale is head_dim ** -0.5, timm's `self.scale`
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(_merge_heads(out)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as timm
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block (timm's `vision_transformer.Block`, no layer scale)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, proj_drop: float,
                 attn_drop: float, drop_path: float):
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class CrossAttention(nn.Module):
    """Cross-attention whose only query is the CLS token (token 0); keys/values are all tokens.

    `folded` (set by `model.fold.folded_cross_attention`, which the ONNX export uses; eager keeps timm's
    form): the same function without projecting all N tokens to keys and values. With one query
    per head, `q_h . (Wk_h x_n + bk_h)` is `(q_h Wk_h) . x_n` plus a constant over n, which the
    softmax drops, and because a head's weights sum to 1, `sum_n a_n (Wv_h x_n + bv_h)` is
    `Wv_h (sum_n a_n x_n) + bv_h`. So 2 N C^2 multiply-adds become 2 H C^2 + 2 H N C (on
    crossvit_15_240 the six cross-attentions' 0.53 of 10.2 GFLOP in matrix products become 0.03):
    1e-6 from timm's form in float32, and int8-ov 4.4 % faster at batch 1 (median per-turn ratio
    over 30 turns, 2-core AVX-512 EPYC; benchmarks/results/cpu_epyc_2core/cpu_path/cross_attention_fold/).

    OpenVINO 2026.4.1 compiles this form's int8-ov file, as one dynamic-batch model, into wrong
    answers (relative L2 0.26 against fp32 on crossvit_15_240; static shapes, what every command runs:
    0.046), so `OpenVinoSession` refuses a dynamic batch for int8-ov files (runtime/openvino.py). Each head's
    weights by themselves as Einsums compiled right there but made static int8-ov answers depend on
    batch-mates (3 rows of 1300 over 1e-4 on crossvit_digits' seed-form fold; this form: none), so
    it was not kept (benchmarks/results/cpu_epyc_2core/cpu_path/einsum_fold/).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.folded = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded and not self.training:
            return self._folded(x)
        q = _split_heads(self.wq(x[:, 0:1]), self.num_heads)  # B, 1, C -> B, H, 1, C/H
        k = _split_heads(self.wk(x), self.num_heads)  # B, N, C -> B, H, N, C/H
        v = _split_heads(self.wv(x), self.num_heads)  # B, N, C -> B, H, N, C/H
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(_merge_heads(out)))  # B, H, 1, C/H -> B, 1, C

    def _folded(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        heads = self.num_heads
        # head h's channels: (H, C), 1 where channel c belongs to head h
        mask = (torch.arange(c, device=x.device) // (c // heads)
                == torch.arange(heads, device=x.device)[:, None]).to(x.dtype)
        q = self.wq(x[:, 0:1])  # B, 1, C
        qk = (q * mask) @ self.wk.weight  # B, H, C: each head's query through its key weights
        scores = (qk @ x.transpose(1, 2)) * (c // heads) ** -0.5  # B, H, N (the key bias cancels)
        mixed = scores.softmax(-1) @ x  # B, H, C: each head's attention-weighted tokens
        out = (self.wv(mixed) * mask).sum(1, keepdim=True)  # B, 1, C: head h's channels from row h
        return self.proj_drop(self.proj(out))


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention; returns the updated CLS token only (B, 1, C)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, proj_drop: float, attn_drop: float,
                 drop_path: float):
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = CrossAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0:1] + self.drop_path(self.attn(self.norm1(x)))  # B, 1, C


def _projection(dim_in: int, dim_out: int) -> nn.Sequential:
    """LN -> GELU -> Linear: f (CLS into the other branch's width) and g (back)."""
    return nn.Sequential(_layer_norm(dim_in), nn.GELU(), nn.Linear(dim_in, dim_out))


class MultiScaleBlock(nn.Module):
    """Each branch's transformer blocks, then CLS-token cross-attention between the branches."""

    def __init__(self, *, dim: tuple[int, int], depth: tuple[int, int, int], num_heads: tuple[int, int],
                 mlp_ratio: tuple[float, ...], qkv_bias: bool, proj_drop: float, attn_drop: float,
                 drop_path: list[float]):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(*(Block(dim[d], num_heads[d], mlp_ratio[d], qkv_bias, proj_drop, attn_drop,
                                  drop_path[i]) for i in range(depth[d])))
            for d in range(NUM_BRANCHES)
        )
        self.projs = nn.ModuleList(_projection(dim[d], dim[1 - d]) for d in range(NUM_BRANCHES))

        def cross_block(d: int) -> CrossAttentionBlock:  # branch d's CLS, in the other branch's width
            return CrossAttentionBlock(dim[1 - d], num_heads[1 - d], qkv_bias, proj_drop, attn_drop,
                                       drop_path[-1])

        # timm: a cross depth of 0 means one block not wrapped in a Sequential (state_dict
        # `fusion.0.norm1.weight`); k > 0 means a Sequential of k (`fusion.0.0.norm1.weight`)
        self.fusion = nn.ModuleList(
            cross_block(d) if depth[-1] == 0 else nn.Sequential(*(cross_block(d) for _ in range(depth[-1])))
            for d in range(NUM_BRANCHES)
        )
        self.revert_projs = nn.ModuleList(_projection(dim[1 - d], dim[d]) for d in range(NUM_BRANCHES))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        outs_b = [block(x) for block, x in zip(self.blocks, xs)]  # per branch: B, 1+N_d, D_d
        # f: each CLS token into the other branch's width
        proj_cls = [proj(out[:, 0:1]) for proj, out in zip(self.projs, outs_b)]  # B, 1, D_other
        outs = []
        for d in range(NUM_BRANCHES):
            other = outs_b[1 - d]
            tmp = torch.cat((proj_cls[d], other[:, 1:]), dim=1)  # B, 1+N_other, D_other
            cls = self.fusion[d](tmp)  # B, 1, D_other
            cls = self.revert_projs[d](cls)  # g: B, 1, D_d
            outs.append(torch.cat((cls, outs_b[d][:, 1:]), dim=1))  # B, 1+N_d, D_d
        return outs


# ---------------------------------------------------------------------------------------------
# The model


class OfficialCrossViT(nn.Module):
    """The official (IBM / timm) CrossViT; keyword arguments and defaults are timm's `CrossVit`."""

    architecture = "official"

    def __init__(self, *, img_size: int | tuple[int, int] = 224, img_scale: tuple[float, ...] = (1.0, 1.0),
                 patch_size: tuple[int, ...] = (8, 16), in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: tuple[int, ...] = (192, 384),
                 depth: tuple[tuple[int, ...], ...] = ((1, 3, 1), (1, 3, 1), (1, 3, 1)),
                 num_heads: tuple[int, ...] = (6, 12), mlp_ratio: tuple[float, ...] = (2.0, 2.0, 4.0),
                 multi_conv: bool = False, crop_scale: bool = False, qkv_bias: bool = True,
                 global_pool: str = "token", drop_rate: float = 0.0, pos_drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        fields = OfficialConfig.__dataclass_fields__
        cfg = OfficialConfig(**{k: v for k, v in locals().items() if k in fields})
        self.config = cfg
        sizes = cfg.branch_sizes
        num_patches = [(h // p) * (w // p) for (h, w), p in zip(sizes, cfg.patch_size)]

        for i in range(NUM_BRANCHES):  # plain attributes, timm's names (pos_embed_0, cls_token_0, ...)
            tokens = 1 + num_patches[i]  # CLS + patches
            setattr(self, f"pos_embed_{i}", nn.Parameter(torch.zeros(1, tokens, cfg.embed_dim[i])))
            setattr(self, f"cls_token_{i}", nn.Parameter(torch.zeros(1, 1, cfg.embed_dim[i])))
        self.branch_resize = nn.ModuleList(
            branch_resize(cfg.img_size, size, cfg.crop_scale) for size in sizes)
        self.patch_embed = nn.ModuleList(
            PatchEmbed(patch_size=p, in_chans=cfg.in_chans, embed_dim=d, multi_conv=cfg.multi_conv)
            for p, d in zip(cfg.patch_size, cfg.embed_dim)
        )
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)

        # stochastic depth grows linearly over (large-branch + cross) blocks, as timm counts them
        total_depth = sum(sum(d[-2:]) for d in cfg.depth)
        dpr = torch.linspace(0, cfg.drop_path_rate, total_depth, device="cpu").tolist()
        self.blocks = nn.ModuleList()
        ptr = 0
        for stage in cfg.depth:
            cur = max(stage[:-1]) + stage[-1]
            rates = dpr[ptr:ptr + cur]
            rates += [cfg.drop_path_rate] * (cur - len(rates))  # timm runs short if small > large depth
            self.blocks.append(MultiScaleBlock(
                dim=cfg.embed_dim, depth=stage, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias, proj_drop=cfg.proj_drop_rate, attn_drop=cfg.attn_drop_rate,
                drop_path=rates))
            ptr += cur

        self.norm = nn.ModuleList(_layer_norm(d) for d in cfg.embed_dim)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.ModuleList(nn.Linear(d, cfg.num_classes) for d in cfg.embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """timm's init: truncated normal (std .02) for tokens and Linear weights, zero biases."""
        for i in range(NUM_BRANCHES):
            nn.init.trunc_normal_(getattr(self, f"pos_embed_{i}"), std=0.02)
            nn.init.trunc_normal_(getattr(self, f"cls_token_{i}"), std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, config: OfficialConfig) -> "OfficialCrossViT":
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one input image: timm's img_size (its pretrained cfg's input_size)."""
        c = self.config
        return (c.in_chans, c.img_size[0], c.img_size[1])

    def cls_cross_attentions(self) -> list[nn.Module]:
        """Every cross-attention: its folded form (`CrossAttention._folded`) has fewer multiply-adds
        for any of the family's token counts (197 and more). `model.fold.folded_cross_attention` sets them."""
        return [m for m in self.modules() if isinstance(m, CrossAttention)]

    def _embed(self, x: torch.Tensor) -> list[torch.Tensor]:
        xs = []
        cls_tokens = (self.cls_token_0, self.cls_token_1)
        pos_embeds = (self.pos_embed_0, self.pos_embed_1)
        for resize, embed, cls, pos in zip(self.branch_resize, self.patch_embed, cls_tokens, pos_embeds):
            tokens = embed(resize(x))  # B, N_d, D_d
            cls = cls.expand(tokens.shape[0], -1, -1)  # 1, 1, D_d -> B, 1, D_d
            tokens = torch.cat((cls, tokens), dim=1) + pos  # B, 1+N_d, D_d
            xs.append(self.pos_drop(tokens))
        return xs

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Both branches' final normalized tokens: [(B, 1+N_0, D_0), (B, 1+N_1, D_1)]."""
        xs = self._embed(x)
        for block in self.blocks:
            xs = block(xs)
        return [norm(t) for norm, t in zip(self.norm, xs)]

    def forward_head(self, xs: list[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        """Pool each branch (CLS or mean of patches), classify, average the two branches' logits."""
        if self.config.global_pool == "avg":
            pooled = [t[:, 1:].mean(dim=1) for t in xs]  # B, D_d
        else:
            pooled = [t[:, 0] for t in xs]  # B, D_d
        pooled = [self.head_drop(p) for p in pooled]
        if pre_logits:
            return torch.cat(pooled, dim=1)  # B, D_0 + D_1
        logits = [head(p) for head, p in zip(self.head, pooled)]  # 2 x (B, num_classes)
        return torch.mean(torch.stack(logits, dim=0), dim=0)  # B, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------
# Foreign checkpoints


def checkpoint_filter_fn(state_dict: dict) -> dict:
    """IBM's release names -> timm's (`pos_embed.0` -> `pos_embed_0`, `cls_token.1` -> ...).

    IBM's code keeps the tokens in ParameterLists; timm (and this model) use plain attributes.
    timm-named dicts pass through unchanged. Pure: returns a new dict, tensors shared.
    """
    out = {}
    for key, value in state_dict.items():
        for name in ("pos_embed", "cls_token"):
            if key.startswith(name + "."):
                key = name + "_" + key[len(name) + 1:]
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Named variants: timm's eleven entry points as one table (timm names *_224 of IBM as *_240)

_S240 = dict(img_size=240, img_scale=(1.0, 224 / 240))
_S408 = dict(img_size=408, img_scale=(1.0, 384 / 408))
_VARIANTS = {
    # name: (resolution, embed_dim, blocks per branch (small, large), num_heads, mlp_ratio, multi_conv)
    "crossvit_tiny_240": (_S240, (96, 192), (1, 4), (3, 3), (4, 4, 1), False),
    "crossvit_small_240": (_S240, (192, 384), (1, 4), (6, 6), (4, 4, 1), False),
    "crossvit_base_240": (_S240, (384, 768), (1, 4), (12, 12), (4, 4, 1), False),
    "crossvit_9_240": (_S240, (128, 256), (1, 3), (4, 4), (3, 3, 1), False),
    "crossvit_15_240": (_S240, (192, 384), (1, 5), (6, 6), (3, 3, 1), False),
    "crossvit_18_240": (_S240, (224, 448), (1, 6), (7, 7), (3, 3, 1), False),
    "crossvit_9_dagger_240": (_S240, (128, 256), (1, 3), (4, 4), (3, 3, 1), True),
    "crossvit_15_dagger_240": (_S240, (192, 384), (1, 5), (6, 6), (3, 3, 1), True),
    "crossvit_18_dagger_240": (_S240, (224, 448), (1, 6), (7, 7), (3, 3, 1), True),
    "crossvit_15_dagger_408": (_S408, (192, 384), (1, 5), (6, 6), (3, 3, 1), True),
    "crossvit_18_dagger_408": (_S408, (224, 448), (1, 6), (7, 7), (3, 3, 1), True),
}


def _spec(name: str, res: dict, embed_dim, branch_depth, num_heads, mlp_ratio, multi_conv) -> ModelSpec:
    size = res["img_size"]
    config = OfficialConfig(
        img_size=size, img_scale=res["img_scale"], patch_size=(12, 16), num_classes=1000,
        embed_dim=embed_dim, depth=((*branch_depth, 0),) * 3, num_heads=num_heads,
        mlp_ratio=mlp_ratio, multi_conv=multi_conv,
    ).to_dict()
    return ModelSpec(
        name=name, architecture="official", config=config,
        # timm's pretrained cfg: crop_pct 0.875 at 240, 1.0 at 408; bicubic; ImageNet mean/std
        preprocessing=Preprocessing(input_size=(3, size, size), crop_pct=0.875 if size == 240 else 1.0,
                                    interpolation="bicubic"),
        labels="imagenet-1k", weights=None,
        description=f"official CrossViT ({'dagger, ' if multi_conv else ''}{size}px, "
                    f"dims {embed_dim[0]}/{embed_dim[1]}), timm/IBM compatible",
    )


SPECS: list[ModelSpec] = [_spec(name, *row) for name, row in _VARIANTS.items()]
