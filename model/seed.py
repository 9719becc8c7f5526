"""The seed CrossViT: vit-pytorch's `cross_vit.py`, rewritten for deployment.

CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification
(Chen, Fan, Panda; ICCV 2021, https://arxiv.org/abs/2103.14899), in the form of
lucidrains' vit-pytorch: two branches see the same image cut into small and large patches;
after each pair of branch encoders, the CLS token of each branch attends to the other
branch's patch tokens; the two heads' logits are summed.

Compatibility contract: the constructor takes exactly vit-pytorch's keyword arguments with the
same defaults, and `state_dict()` has exactly vit-pytorch's keys and shapes, so a vit-pytorch
checkpoint loads with `strict=True` and computes the same logits (tests/test_seed_model.py
checks this against the real vit-pytorch file).

Deployment changes (same function, different code): attention goes through
`F.scaled_dot_product_attention`; the einops rearranges are plain reshapes/permutes; `forward`
has no shape-dependent Python branches, so torch.export sees one graph for every batch size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from crossvit.errors import ConfigError

from .spec import dataclass_from_dict


@dataclass(frozen=True)
class SeedConfig:
    """vit-pytorch `CrossViT` arguments, same names and defaults (so a user's config maps 1:1)."""

    image_size: int
    num_classes: int
    sm_dim: int  # width of the small-patch (fine) branch
    lg_dim: int  # width of the large-patch (coarse) branch
    sm_patch_size: int = 12
    sm_enc_depth: int = 1  # transformer blocks per multi-scale encoder, small branch
    sm_enc_heads: int = 8
    sm_enc_mlp_dim: int = 2048
    sm_enc_dim_head: int = 64
    lg_patch_size: int = 16
    lg_enc_depth: int = 4
    lg_enc_heads: int = 8
    lg_enc_mlp_dim: int = 2048
    lg_enc_dim_head: int = 64
    cross_attn_depth: int = 2  # CLS<->patch cross-attention rounds per multi-scale encoder
    cross_attn_heads: int = 8
    cross_attn_dim_head: int = 64
    depth: int = 3  # number of multi-scale encoders
    dropout: float = 0.1  # training only; eval/export is deterministic
    emb_dropout: float = 0.1
    channels: int = 3

    def __post_init__(self) -> None:
        problems = []
        positive = [
            "image_size", "num_classes", "sm_dim", "lg_dim", "sm_patch_size", "lg_patch_size",
            "sm_enc_heads", "sm_enc_mlp_dim", "sm_enc_dim_head", "lg_enc_heads", "lg_enc_mlp_dim",
            "lg_enc_dim_head", "cross_attn_heads", "cross_attn_dim_head", "depth", "channels",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name}={value!r} must be a positive integer")
        for name in ("sm_enc_depth", "lg_enc_depth", "cross_attn_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"{name}={value!r} must be a non-negative integer")
        for name in ("dropout", "emb_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                problems.append(f"{name}={value!r} must be in [0, 1)")
        if not problems:
            for name in ("sm_patch_size", "lg_patch_size"):
                if self.image_size % getattr(self, name):
                    problems.append(
                        f"image_size={self.image_size} is not divisible by "
                        f"{name}={getattr(self, name)}"
                    )
        if problems:
            raise ConfigError("invalid seed CrossViT config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict) -> "SeedConfig":
        """Build from a plain dict (a checkpoint's or a user's JSON), naming unknown keys."""
        return dataclass_from_dict(cls, values, "seed CrossViT config")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class PatchToTokens(nn.Module):
    """`b c (h p1) (w p2) -> b (h w) (p1 p2 c)` (vit-pytorch's Rearrange), as reshape/permute."""

    def __init__(self, patch_size: int):
        super().__init__()
        self.patch_size = patch_size

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        c, hp, wp = img.shape[1], img.shape[2] // p, img.shape[3] // p
        x = img.reshape(-1, c, hp, p, wp, p)  # B, C, H/p, p1, W/p, p2
        x = x.permute(0, 2, 4, 3, 5, 1)  # B, H/p, W/p, p1, p2, C
        return x.reshape(-1, hp * wp, p * p * c)  # B, N, p1*p2*C


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Pre-norm multi-head attention; with `context`, queries come from `x` only.

    As in vit-pytorch, only `x` is normalized; `context` (the other branch's patch tokens,
    already normalized by that branch's encoder) is used as it is.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        self.heads = heads
        self.dim_head = dim_head
        self.dropout_p = dropout
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(dropout))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)  # B,N,H*D -> B,H,N,D

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, kv_include_self: bool = False
    ) -> torch.Tensor:
        x = self.norm(x)
        if context is None:
            context = x
        elif kv_include_self:
            context = torch.cat((x, context), dim=1)  # the CLS query also attends to itself
        k, v = self.to_kv(context).chunk(2, dim=-1)
        q, k, v = map(self._split_heads, (self.to_q(x), k, v))
        # default scale of SDPA is dim_head ** -0.5, vit-pytorch's `self.scale`
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout_p if self.training else 0.0
        )
        out = out.transpose(1, 2).flatten(2)  # B,H,N,D -> B,N,H*D
        return self.to_out(out)


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head, dropout), FeedForward(dim, mlp_dim, dropout)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


class ProjectInOut(nn.Module):
    """Project the CLS token into the other branch's width and back (identity if equal).

    Whether the projections exist is decided at construction, so the state_dict keys match
    vit-pytorch's (no `project_in` keys when the widths are equal).
    """

    def __init__(self, dim_in: int, dim_out: int, fn: nn.Module):
        super().__init__()
        self.fn = fn
        need_projection = dim_in != dim_out
        self.project_in = nn.Linear(dim_in, dim_out) if need_projection else nn.Identity()
        self.project_out = nn.Linear(dim_out, dim_in) if need_projection else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.fn(self.project_in(x), context=context, kv_include_self=True))


class CrossTransformer(nn.Module):
    def __init__(self, sm_dim: int, lg_dim: int, depth: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([
                ProjectInOut(sm_dim, lg_dim, Attention(lg_dim, heads, dim_head, dropout)),
                ProjectInOut(lg_dim, sm_dim, Attention(sm_dim, heads, dim_head, dropout)),
            ])
            for _ in range(depth)
        )

    def forward(self, sm_tokens: torch.Tensor, lg_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sm_cls, sm_patch = sm_tokens[:, :1], sm_tokens[:, 1:]  # B,1,Ds and B,Ns,Ds
        lg_cls, lg_patch = lg_tokens[:, :1], lg_tokens[:, 1:]  # B,1,Dl and B,Nl,Dl
        for sm_attend_lg, lg_attend_sm in self.layers:
            sm_cls = sm_attend_lg(sm_cls, context=lg_patch) + sm_cls
            lg_cls = lg_attend_sm(lg_cls, context=sm_patch) + lg_cls
        return torch.cat((sm_cls, sm_patch), dim=1), torch.cat((lg_cls, lg_patch), dim=1)


class MultiScaleEncoder(nn.Module):
    def __init__(self, *, depth: int, sm_dim: int, lg_dim: int, sm_enc_params: dict, lg_enc_params: dict,
                 cross_attn_heads: int, cross_attn_depth: int, cross_attn_dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([
                Transformer(dim=sm_dim, dropout=dropout, **sm_enc_params),
                Transformer(dim=lg_dim, dropout=dropout, **lg_enc_params),
                CrossTransformer(sm_dim, lg_dim, cross_attn_depth, cross_attn_heads,
                                 cross_attn_dim_head, dropout),
            ])
            for _ in range(depth)
        )

    def forward(self, sm_tokens: torch.Tensor, lg_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for sm_enc, lg_enc, cross_attend in self.layers:
            sm_tokens, lg_tokens = sm_enc(sm_tokens), lg_enc(lg_tokens)
            sm_tokens, lg_tokens = cross_attend(sm_tokens, lg_tokens)
        return sm_tokens, lg_tokens


class ImageEmbedder(nn.Module):
    def __init__(self, *, dim: int, image_size: int, patch_size: int, dropout: float = 0.0, channels: int = 3):
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        patch_dim = channels * patch_size**2
        self.to_patch_embedding = nn.Sequential(
            PatchToTokens(patch_size),
            nn.LayerNorm(patch_dim),
            nn.Linear(patch_dim, dim),
            nn.LayerNorm(dim),
        )
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.to_patch_embedding(img)  # B, N, D
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # 1,1,D -> B,1,D
        x = torch.cat((cls, x), dim=1) + self.pos_embedding  # B, N+1, D
        return self.dropout(x)


class CrossViT(nn.Module):
    """The seed CrossViT; keyword arguments and defaults are vit-pytorch's (see `SeedConfig`)."""

    architecture = "seed"

    def __init__(self, *, image_size: int, num_classes: int, sm_dim: int, lg_dim: int,
                 sm_patch_size: int = 12, sm_enc_depth: int = 1, sm_enc_heads: int = 8,
                 sm_enc_mlp_dim: int = 2048, sm_enc_dim_head: int = 64, lg_patch_size: int = 16,
                 lg_enc_depth: int = 4, lg_enc_heads: int = 8, lg_enc_mlp_dim: int = 2048,
                 lg_enc_dim_head: int = 64, cross_attn_depth: int = 2, cross_attn_heads: int = 8,
                 cross_attn_dim_head: int = 64, depth: int = 3, dropout: float = 0.1,
                 emb_dropout: float = 0.1, channels: int = 3):
        super().__init__()
        cfg = SeedConfig(**{k: v for k, v in locals().items() if k in SeedConfig.__dataclass_fields__})
        self.config = cfg
        self.sm_image_embedder = ImageEmbedder(dim=sm_dim, image_size=image_size, patch_size=sm_patch_size,
                                               dropout=emb_dropout, channels=channels)
        self.lg_image_embedder = ImageEmbedder(dim=lg_dim, image_size=image_size, patch_size=lg_patch_size,
                                               dropout=emb_dropout, channels=channels)
        self.multi_scale_encoder = MultiScaleEncoder(
            depth=depth, sm_dim=sm_dim, lg_dim=lg_dim,
            cross_attn_heads=cross_attn_heads, cross_attn_dim_head=cross_attn_dim_head,
            cross_attn_depth=cross_attn_depth,
            sm_enc_params=dict(depth=sm_enc_depth, heads=sm_enc_heads, mlp_dim=sm_enc_mlp_dim,
                               dim_head=sm_enc_dim_head),
            lg_enc_params=dict(depth=lg_enc_depth, heads=lg_enc_heads, mlp_dim=lg_enc_mlp_dim,
                               dim_head=lg_enc_dim_head),
            dropout=dropout,
        )
        self.sm_mlp_head = nn.Sequential(nn.LayerNorm(sm_dim), nn.Linear(sm_dim, num_classes))
        self.lg_mlp_head = nn.Sequential(nn.LayerNorm(lg_dim), nn.Linear(lg_dim, num_classes))

    @classmethod
    def from_config(cls, config: SeedConfig) -> "CrossViT":
        return cls(**config.to_dict())

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one input image."""
        c = self.config
        return (c.channels, c.image_size, c.image_size)

    def forward_features(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the two branches' final CLS tokens (B, sm_dim) and (B, lg_dim)."""
        sm_tokens = self.sm_image_embedder(img)
        lg_tokens = self.lg_image_embedder(img)
        sm_tokens, lg_tokens = self.multi_scale_encoder(sm_tokens, lg_tokens)
        return sm_tokens[:, 0], lg_tokens[:, 0]

    def forward_head(self, sm_cls: torch.Tensor, lg_cls: torch.Tensor) -> torch.Tensor:
        return self.sm_mlp_head(sm_cls) + self.lg_mlp_head(lg_cls)  # logits are summed

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.forward_head(*self.forward_features(img))
