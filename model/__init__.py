"""CrossViT models: the seed (vit-pytorch) and official (IBM/timm) families, registry, checkpoints.

Imports torch only; knows nothing of ONNX, TensorRT or serving.
"""

from .checkpoint import LoadedModel, ModelInfo, load_checkpoint, load_model, save_checkpoint
from .registry import DEFAULT_MODEL, build_model, create_model, get_spec, list_models
from .seed import CrossViT, SeedConfig
from .spec import ModelSpec, Preprocessing

__all__ = [
    "CrossViT", "SeedConfig", "ModelSpec", "Preprocessing", "ModelInfo", "LoadedModel",
    "DEFAULT_MODEL", "build_model", "create_model", "get_spec", "list_models",
    "load_checkpoint", "load_model", "save_checkpoint",
]
