"""Files shipped inside the package, found with importlib.resources (never a source-tree path).

The same calls work from an editable install, a wheel and a plain `pip install .`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from crossvit.errors import ConfigError


def asset(name: str) -> Path:
    """The filesystem path of a shipped file or folder, e.g. `asset("heldout")`."""
    found = resources.files(__name__).joinpath(name)
    if not found.is_file() and not found.is_dir():
        raise ConfigError(f"the installed crossvit package lacks its asset {name!r} (reinstall crossvit)")
    if not isinstance(found, Path):  # a zipped install: nothing we ship can be memory-mapped there
        raise ConfigError(f"crossvit's asset {name!r} is not on the filesystem (installed from a zip?); "
                          "install crossvit as a normal package")
    return found


def heldout_images() -> Path:
    """The held-out real images of the embedded default model (PNG files + labels.csv)."""
    return asset("heldout")
