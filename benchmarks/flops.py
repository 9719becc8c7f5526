"""FLOPs of a forward pass: PyTorch's counter, plus the attention it does not see.

`torch.utils.flop_counter.FlopCounterMode` counts matmuls and convolutions (2 FLOPs per
multiply-add) and has formulas for the CUDA attention kernels, but none for the CPU's
(`_scaled_dot_product_flash_attention_for_cpu`), so on a CPU the two attention matmuls
(q·kᵀ and attn·v) would be missing. We add them with PyTorch's own `sdpa_flop_count`.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn, *args) -> int:
    """FLOPs of `fn(*args)` (2 per multiply-add), attention matmuls included."""
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    counter = FlopCounterMode(display=False, custom_mapping={cpu_sdpa: _sdpa} if cpu_sdpa is not None else {})
    with torch.inference_mode(), counter:
        fn(*args)
    return counter.get_total_flops()


def official_flops(cfg) -> dict[str, int]:
    """FLOPs of one image of an official CrossViT (`model.official.OfficialConfig`), counted from
    the config alone (2 per multiply-add, biases and elementwise work not counted, as
    `count_flops`): {"resize", "conv", "linear", "attention", "total"}.

    Per branch d with width D, T = 1 + patches tokens and MLP ratio r: each transformer block
    costs 2·T·D²·(4 + 2r) in its linear layers and 4·T²·D in attention (q·kᵀ and attn·v), which
    is the quadratic term. A cross-attention block (in the other branch's width D', over its T'
    tokens, with the CLS token as the only query) costs 2·D'²·(2 + 2T') linear and 4·T'·D'
    attention: linear in the tokens, the paper's claim. (With a cross depth over 1, the blocks
    after the first see only the CLS token the previous one returned, as in timm.)
    """
    from crossvit.model.official import DAGGER_STEMS

    (img_h, img_w), c_in = cfg.img_size, cfg.in_chans
    out = {"resize": 0, "conv": 0, "linear": 0, "attention": 0}
    tokens, dims = [], cfg.embed_dim
    for (h, w), p, dim in zip(cfg.branch_sizes, cfg.patch_size, dims):
        if (h, w) != (img_h, img_w) and not (cfg.crop_scale and h <= img_h and w <= img_w):
            out["resize"] += 2 * c_in * (img_h * img_w * w + h * img_h * w)  # x @ Bᵀ, then A @ x
        if cfg.multi_conv:
            (s2, p2), (s3, p3) = DAGGER_STEMS[p]
            side = [(h + 6 - 7) // 4 + 1, (w + 6 - 7) // 4 + 1]
            chans = [c_in, dim // 4, dim // 2, dim]
            out["conv"] += 2 * chans[0] * 49 * chans[1] * side[0] * side[1]
            for (s, pad), (ci, co) in zip(((s2, p2), (s3, p3)), ((chans[1], chans[2]), (chans[2], chans[3]))):
                side = [(x + 2 * pad - 3) // s + 1 for x in side]
                out["conv"] += 2 * ci * 9 * co * side[0] * side[1]
        else:
            out["conv"] += 2 * c_in * p * p * dim * (h // p) * (w // p)
        tokens.append(1 + (h // p) * (w // p))
    for stage in cfg.depth:
        for d in range(2):
            t, dim = tokens[d], dims[d]
            hidden = int(dim * cfg.mlp_ratio[d])
            out["linear"] += stage[d] * 2 * t * dim * (4 * dim + 2 * hidden)
            out["attention"] += stage[d] * 4 * t * t * dim
        for d in range(2):  # branch d's CLS into the other branch (width D', T' tokens), and back
            t, dim, own = tokens[1 - d], dims[1 - d], dims[d]
            out["linear"] += 2 * own * dim * 2  # f and g: one token each way
            # the first block: wq + proj on the CLS, wk + wv on all T' tokens; a block returns the
            # CLS alone, so each further one (cross depth > 1, as timm nests them) sees 1 token
            for seen in [t] + [1] * (max(stage[-1], 1) - 1):
                out["linear"] += 2 * dim * dim * (2 + 2 * seen)
                out["attention"] += 4 * seen * dim
    out["linear"] += sum(2 * dim * cfg.num_classes for dim in dims)  # the two heads
    out["total"] = sum(out.values())
    return out
