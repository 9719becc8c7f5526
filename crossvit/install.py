"""The pip command that adds one of crossvit's extras to the install at hand.

crossvit is not on PyPI, so `pip install 'crossvit[quant]'` names nothing pip can find. Every
"install this" hint the project prints comes from `pip_install(extra)`:

- from a checkout (an editable install: the imported package folder sits in a checkout, beside
  its setup.cfg and pyproject.toml), `pip install -e '/path/to/checkout[quant]'`, which installs
  the extra's packages and keeps the editable install;
- otherwise (a wheel, or `pip install .`, whose copy in site-packages has no checkout beside it),
  the extra's packages by name, read from the installed distribution's metadata
  (`importlib.metadata.requires`), so the hint never drifts from setup.cfg.

`install_command` is the pure part (the facts in, the command out); `pip_install` gathers the
facts from this process. Imports nothing beyond the standard library.
"""

from __future__ import annotations

import configparser
import re
import shlex
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "crossvit"
_EXTRA_MARKER = re.compile(r"""\bextra\s*==\s*["']([^"']+)["']""")


def _normalized(extra: str) -> str:
    """Extra names compare as PEP 685 says: lower case, runs of '-', '_', '.' as one '-'."""
    return re.sub(r"[-_.]+", "-", extra).lower()


def checkout_extras(package_dir: Path) -> list[str] | None:
    """The extras of the checkout whose `crossvit/` folder is `package_dir` (from its setup.cfg),
    or None where `package_dir` is not in a crossvit checkout (a wheel's site-packages)."""
    root = Path(package_dir).parent
    cfg = root / "setup.cfg"
    if not (root / "pyproject.toml").is_file() or not cfg.is_file():
        return None
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(cfg, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError, OSError):
        return None
    if parser.get("metadata", "name", fallback=None) != DISTRIBUTION:
        return None
    return list(parser["options.extras_require"]) if parser.has_section("options.extras_require") else []


def extra_requirements(requires: list[str], extra: str) -> list[str]:
    """The requirements `extra` adds, from a distribution's Requires-Dist entries
    (`'nvidia-modelopt==0.47.0; extra == "quant"'`)."""
    out = []
    for entry in requires:
        requirement, _, marker = entry.partition(";")
        found = _EXTRA_MARKER.search(marker)
        if found and _normalized(found.group(1)) == _normalized(extra):
            out.append(requirement.strip())
    return out


def install_command(extra: str, *, checkout: Path | None, checkout_extras: list[str] | None = None,
                    requires: list[str] | None = None) -> str:
    """The command that installs `extra`: from `checkout` where the package runs from one, else
    the extra's packages from `requires` (the distribution's Requires-Dist entries).

    An extra that the checkout's setup.cfg or the distribution's metadata does not have is a
    ValueError: a hint naming it would send the reader nowhere."""
    if checkout is not None:
        if checkout_extras is not None and _normalized(extra) not in map(_normalized, checkout_extras):
            raise ValueError(f"{checkout / 'setup.cfg'} has no extra {extra!r}")
        return f"pip install -e {shlex.quote(f'{checkout}[{extra}]')}"
    if requires is None:  # imported from a copy with no distribution metadata at all
        return f"pip install the packages of crossvit's {extra!r} extra (its setup.cfg lists them)"
    packages = extra_requirements(requires, extra)
    if not packages:
        raise ValueError(f"the installed {DISTRIBUTION} has no extra {extra!r}")
    return "pip install " + " ".join(shlex.quote(p) for p in packages)


def pip_install(extra: str) -> str:
    """The command that adds `extra` to the crossvit this process imported."""
    import crossvit

    package_dir = Path(crossvit.__file__).resolve().parent
    extras = checkout_extras(package_dir)
    if extras is not None:
        return install_command(extra, checkout=package_dir.parent, checkout_extras=extras)
    try:
        requires = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        requires = None
    return install_command(extra, checkout=None, requires=requires)
