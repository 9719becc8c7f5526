"""One small hierarchy of errors; the CLI catches `CrossViTError` once and prints one line.

Every subpackage (model, export, runtime) raises these, so this module imports nothing.
"""


class CrossViTError(Exception):
    """Base of every error this project raises on purpose (bad input, missing tools)."""

    exit_code = 1


class ConfigError(CrossViTError, ValueError):
    """An impossible or unknown model configuration."""


class UsageError(ConfigError):
    """An option value the command refuses, as argparse refuses a malformed one (exit code 2)."""

    exit_code = 2


class CheckpointError(CrossViTError):
    """A checkpoint that is missing, corrupt, unsafe or does not fit the model."""


class ExportError(CrossViTError):
    """The ONNX export or a precision conversion failed or was asked for something impossible."""


class InputError(CrossViTError, ValueError):
    """Bad user data: an image that is not an image, a tensor of the wrong shape or dtype."""


class ArtifactError(CrossViTError):
    """An ONNX file or engine that is missing, corrupt or lacks the metadata we need."""


class BatchSizeRefused(ArtifactError):
    """A model compiled for one batch size answers a row differently from the session's first
    (a row's answer would depend on its batch-mates): refused, never run."""


class BackendUnavailable(CrossViTError):
    """An optional backend (TensorRT, CUDA, ModelOpt, torch) is not installed or has no device."""

    exit_code = 3


class ParityFailure(CrossViTError):
    """An artifact does not compute the same function as its reference within the thresholds."""

    exit_code = 2


class OutputError(CrossViTError):
    """An output path that cannot be written: a folder, a read-only or full filesystem."""
