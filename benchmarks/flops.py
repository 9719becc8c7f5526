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
