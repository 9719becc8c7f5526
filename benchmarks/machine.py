"""What every result file carries about where it was measured: the machine (CPU model and
flags, cores, load average, GPU and driver, library versions), whether it was busy, and the
command line that produced it."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from crossvit.runtime.cpu_choice import SPEED_FLAGS, cpu_flags, cpu_model


def machine_description() -> dict:
    """What every result carries: the machine and the library versions it was measured with.

    `load_average` (1, 5, 15 minutes) is taken when this is called: benchmarks call it before they
    start timing, so it says how busy the machine was with other work."""
    import onnxruntime

    gpu = torch.cuda.is_available()
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(), "cpu_flags": sorted(set(SPEED_FLAGS) & cpu_flags()), "cores": os.cpu_count(),
            "load_average": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__,
            "cuda": torch.cuda.get_device_name(0) if gpu else None,
            "cuda_runtime": torch.version.cuda if gpu else None, "gpu_driver": _gpu_driver() if gpu else None,
            **{name: _installed(dist) for name, dist in OPTIONAL_LIBRARIES.items()}}


def busy_machine(machine: dict) -> str | None:
    """A warning when the 1-minute load average before timing says other work was running (over
    half the cores busy, and over 1): such figures can be off by 2-3x. (A run's own export before
    its timing raises the average by about 0.5 on 2 cores; that alone is no reason to warn.)"""
    load, cores = (machine.get("load_average") or [0])[0], machine.get("cores") or 1
    if load > max(1.0, cores / 2):
        return (f"the machine was busy when timing began (load average {load:.2f} on {cores} cores): other work "
                "moves these figures, by 2-3x on a small machine; time again when it is quiet")
    return None


def command_line() -> str:
    """The command that made a result, as it can be typed again (shell-quoted; `python -m MODULE
    ...` for a module run, `crossvit ...` for the console script), with the folder it ran in."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if "-m" in argv[1:3]:
        words = ["python", *argv[argv.index("-m"):]]
    else:
        words = [Path(sys.argv[0]).name, *sys.argv[1:]]
    return f"{shlex.join(words)}  (in {os.getcwd()})"


# optional libraries that change what a result means, by distribution name (read, never imported)
OPTIONAL_LIBRARIES = {"modelopt": "nvidia-modelopt", "tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt-rtx",
                      "onnxscript": "onnxscript", "onnx": "onnx", "openvino": "openvino", "nncf": "nncf"}


def _installed(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _gpu_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
