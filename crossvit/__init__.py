"""CrossViT deployment pipeline: checkpoint -> ONNX -> precision variants -> TensorRT -> serving."""

__version__ = "0.1.0"
