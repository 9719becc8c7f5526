"""CrossViT models: the seed (vit-pytorch) and official (IBM/timm) families, registry, checkpoints.

Imports torch only; knows nothing of ONNX, TensorRT or serving.
"""

from .checkpoint import LoadedModel, ModelInfo, load_checkpoint, save_checkpoint
from .loader import DEFAULT_INIT_SEED, RANDOM_WEIGHTS_NOTE, create_model, load_model, rebuild_random_init
from .registry import DEFAULT_MODEL, build_model, get_spec, list_models
from .seed import CrossViT, SeedConfig
from .spec import ModelSpec, Preprocessing

__all__ = [
    "CrossViT", "SeedConfig", "ModelSpec", "Preprocessing", "ModelInfo", "LoadedModel",
    "DEFAULT_INIT_SEED", "DEFAULT_MODEL", "RANDOM_WEIGHTS_NOTE", "build_model", "create_model", "get_spec", "list_models",
    "load_checkpoint", "load_model", "rebuild_random_init", "save_checkpoint",
]
