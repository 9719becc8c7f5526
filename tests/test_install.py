"""Install hints name a command that works for the install at hand (crossvit is not on PyPI)."""

import configparser
import os
import re
import shlex
import subprocess
import sys
from importlib import metadata

import pytest

from conftest import REPO
from crossvit.install import checkout_extras, extra_requirements, install_command, pip_install

# Requires-Dist entries as a wheel's METADATA holds them (setuptools' spelling of setup.cfg)
WHEEL_REQUIRES = [
    "torch>=2.6",
    "numpy>=1.24",
    'tensorrt-rtx==1.7.1.116; extra == "rtx"',
    'cuda-python<14,>=13; extra == "rtx"',
    'polygraphy==0.53.6; extra == "rtx"',
    'starlette>=0.40; extra == "serve"',
    'tritonclient[grpc,http]==2.73.0; extra == "serve"',
    'protobuf<7,>=6.33.5; extra == "serve"',
    'matplotlib>=3.8; extra == "bench"',
    'tensorrt-cu12<12,>=10.8; extra == "gpu-cu12"',
]


def _setup_cfg_extras() -> dict[str, list[str]]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "setup.cfg", encoding="utf-8")
    return {name: [line for line in value.splitlines() if line.strip()]
            for name, value in parser["options.extras_require"].items()}


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower().replace("_", "-")


def test_from_this_checkout_the_hint_is_an_editable_install_of_it():
    # the tests run from an editable install of this checkout (make test)
    for extra in ("quant", "serve", "bench", "rtx", "gpu-cu12", "openvino"):
        hint = pip_install(extra)
        assert hint == f"pip install -e '{REPO}[{extra}]'", hint
        assert shlex.split(hint) == ["pip", "install", "-e", f"{REPO}[{extra}]"]
    assert "crossvit[" not in pip_install("quant")  # not a name pip could find: crossvit is not on PyPI


def test_a_checkout_is_recognised_by_its_setup_cfg_and_nothing_else(tmp_path):
    assert checkout_extras(REPO / "crossvit") == list(_setup_cfg_extras())
    site = tmp_path / "site-packages"  # a wheel's copy: no setup.cfg beside the package
    (site / "crossvit").mkdir(parents=True)
    assert checkout_extras(site / "crossvit") is None
    other = tmp_path / "other"  # a checkout of some other project
    (other / "crossvit").mkdir(parents=True)
    (other / "pyproject.toml").write_text("[build-system]\n")
    (other / "setup.cfg").write_text("[metadata]\nname = something-else\n")
    assert checkout_extras(other / "crossvit") is None
    (other / "setup.cfg").write_text("[metadata]\nname = crossvit\n[options.extras_require]\nquant =\n    x==1\n")
    assert checkout_extras(other / "crossvit") == ["quant"]
    assert install_command("quant", checkout=other, checkout_extras=["quant"]) == f"pip install -e '{other}[quant]'"


def test_from_a_wheel_the_hint_names_the_extras_packages_from_the_distribution_metadata():
    assert install_command("serve", checkout=None, requires=WHEEL_REQUIRES) == (
        "pip install 'starlette>=0.40' 'tritonclient[grpc,http]==2.73.0' 'protobuf<7,>=6.33.5'")
    assert install_command("rtx", checkout=None, requires=WHEEL_REQUIRES) == (
        "pip install tensorrt-rtx==1.7.1.116 'cuda-python<14,>=13' polygraphy==0.53.6")
    assert install_command("bench", checkout=None, requires=WHEEL_REQUIRES) == "pip install 'matplotlib>=3.8'"
    # PEP 685: extra names compare normalized, whichever spelling the metadata writer chose
    requires = ['tensorrt-cu12<12,>=10.8; extra == "gpu_cu12"']
    assert extra_requirements(requires, "gpu-cu12") == ["tensorrt-cu12<12,>=10.8"]
    # the shell reads each requirement back as one argument
    words = shlex.split(install_command("serve", checkout=None, requires=WHEEL_REQUIRES))
    assert words[2:] == ["starlette>=0.40", "tritonclient[grpc,http]==2.73.0", "protobuf<7,>=6.33.5"]


def test_the_wheel_hint_follows_setup_cfg_through_the_installed_metadata():
    """The real distribution's Requires-Dist (written from setup.cfg at install) gives every
    package of each extra, so the hint cannot drift from setup.cfg."""
    requires = metadata.requires("crossvit")
    for extra, listed in _setup_cfg_extras().items():
        hint = install_command(extra, checkout=None, requires=requires)
        assert hint.startswith("pip install ") and "crossvit" not in hint, hint
        assert sorted(_name(r) for r in shlex.split(hint)[2:]) == sorted(_name(r) for r in listed), (extra, hint)


def test_an_extra_that_does_not_exist_is_refused_rather_than_hinted():
    with pytest.raises(ValueError, match="no extra 'gpu'"):
        install_command("gpu", checkout=None, requires=WHEEL_REQUIRES)
    with pytest.raises(ValueError, match="no extra 'gpu'"):
        install_command("gpu", checkout=REPO, checkout_extras=list(_setup_cfg_extras()))
    with pytest.raises(ValueError, match="no extra 'gpu'"):
        pip_install("gpu")


def test_every_extra_the_code_hints_exists():
    """Every `pip_install(...)` in the package names an extra of setup.cfg (it raises otherwise)."""
    folders = ("crossvit", "model", "export", "runtime", "benchmarks")
    sources = [p for folder in folders for p in (REPO / folder).rglob("*.py")]
    named = {m.group(1) for p in sources for m in re.finditer(r"""pip_install\(["']([\w.-]+)["']\)""", p.read_text())}
    assert named >= {"quant", "serve", "bench", "openvino", "rtx", "gpu-cu12", "gpu-cu13"}, named
    for extra in named:
        assert pip_install(extra).startswith("pip install -e ")
    from crossvit.runtime.trt_library import LIBRARIES

    for library in LIBRARIES.values():
        assert all(pip_install(extra) in library.install for extra in library.extras)


def test_make_installs_torch_from_its_index_in_its_own_pip_call(tmp_path):
    """`make deploy TORCH_INDEX=...` (README's CUDA line): torch alone, from that index; the project
    in a second call that names neither torch nor an index (one index URL would apply to all)."""
    cuda = "https://download.pytorch.org/whl/cu130"
    # as a user runs it: not as a sub-make of `make test` (its MAKEFLAGS/MAKELEVEL would be inherited)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    proc = subprocess.run(["make", "--no-print-directory", "-n", "deploy", f"VENV={tmp_path / 'v'}",
                           f"TORCH_INDEX={cuda}"], cwd=REPO, capture_output=True, text=True, check=True, env=env)
    assert proc.stdout.splitlines()[1:3] == [  # after creating the venv: torch first, then the project
        f'TORCH="torch==2.13.0" TORCH_INDEX="{cuda}" bash scripts/install_torch.sh {tmp_path / "v"}',
        f'{tmp_path / "v" / "bin" / "pip"} install -q -e ".[quant,serve,rtx,openvino]"']
    default = subprocess.run(["make", "--no-print-directory", "-n", "deploy", f"VENV={tmp_path / 'v'}"], cwd=REPO,
                             capture_output=True, text=True, check=True, env=env).stdout
    assert 'TORCH_INDEX="https://download.pytorch.org/whl/cpu" bash scripts/install_torch.sh' in default


def _install_torch(torch: str, index: str) -> subprocess.CompletedProcess:
    """scripts/install_torch.sh on this test run's own venv (torch==2.13.0 is installed in it)."""
    return subprocess.run(["bash", REPO / "scripts" / "install_torch.sh", sys.prefix], capture_output=True,
                          text=True, env={**os.environ, "TORCH": torch, "TORCH_INDEX": index})


def test_an_unreachable_torch_index_falls_back_to_the_local_torch_or_stops_in_one_line():
    unreachable = "http://127.0.0.1:1/whl/cpu"  # nothing listens on port 1: refused at once
    proc = _install_torch("torch==2.13.0", unreachable)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == f"torch {metadata.version('torch')}, already installed in {sys.prefix}"
    proc = _install_torch("torch==0.0.1", unreachable)  # no local wheel of it: never PyPI's CUDA build unasked
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert errors[0].startswith(f"error: {unreachable} cannot be reached from this machine and pip has no local "
                                "wheel of torch==0.0.1"), errors[0]
