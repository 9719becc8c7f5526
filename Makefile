# Two entry points (README): `make deploy` runs the main job, `make test` the test suite.
# Both create .venv and install torch first, in its own pip call (scripts/install_torch.sh):
# TORCH from TORCH_INDEX, by default the CPU build from PyTorch's CPU index (about 200 MB; torch
# from plain PyPI is the multi-GB CUDA build on Linux x86-64). Where that index cannot be reached,
# a local wheel of TORCH serves (our CI machines). A CUDA machine: TORCH_INDEX= (empty: PyPI's
# CUDA build) or one of PyTorch's CUDA indexes; see the README.
PYTHON      ?= python3
VENV        ?= .venv
TORCH       ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
OUT         ?= deploy-out
BIN          = $(VENV)/bin

.PHONY: deploy test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: $(BIN)/python setup.cfg pyproject.toml
	TORCH="$(TORCH)" TORCH_INDEX="$(TORCH_INDEX)" bash scripts/install_torch.sh $(VENV)
	$(BIN)/pip install -q -e ".[quant,serve,rtx,openvino]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-run
	$(BIN)/pip install -q -e ".[quant,serve,rtx,openvino,dev]"
	# vit-pytorch is the reference the tests compare against; its package __init__ needs
	# torchvision, which the CPU torch build lacks, so it is installed without dependencies
	# and the tests load its cross_vit.py file directly.
	$(BIN)/pip install -q --no-deps "vit-pytorch==1.26.11"
	# Real TensorRT, no GPU needed: TensorRT-RTX (the rtx extra, above) builds every test engine.
	# Standard TensorRT 11.4 cannot be installed from PyPI, but two real pieces of it can: the lean
	# runtime (imports without a GPU: the session's runtime names are checked on its module) and the
	# full bindings' binary (it cannot import without NVIDIA's libraries: the builder's names are
	# read from it). cuda-bindings: the CUDA runtime names the session calls.
	$(BIN)/pip install -q "tensorrt-lean-cu12==11.4.0.106" "cuda-bindings>=12.9"
	$(BIN)/pip install -q --no-deps "tensorrt-cu13-bindings==11.4.0.106"
	touch $@

deploy: $(VENV)/.installed-run
	$(BIN)/crossvit deploy -o $(OUT)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
