"""The CLS-only cross-attentions computed without projecting every token to keys and values.

A CrossViT cross-attention has one query per head (the CLS token), so the key projection of every
token can be moved onto that query and the value projection after the attention's weighted sum:
the same function, fewer multiply-adds (the attention module says how, in `_folded`). The official
family folds; the seed family's fold was measured and not kept (README: OpenVINO's dynamic-batch int8
miscompiled it). Only the ONNX export uses it; eager keeps timm's form."""

from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def folded_cross_attention(model: nn.Module):
    """Within it, the cross-attentions `model.cls_cross_attentions()` names run their folded form
    (eval mode only; a model without that method has none). Yields how many there are."""
    blocks = model.cls_cross_attentions() if hasattr(model, "cls_cross_attentions") else []
    for block in blocks:
        block.folded = True
    try:
        yield len(blocks)
    finally:
        for block in blocks:
            block.folded = False
