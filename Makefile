# Two entry points (README): `make deploy` runs the main job, `make test` the test suite.
# Both create .venv and install the CPU build of torch 2.13.0 first (an unpinned torch pulls
# a multi-GB CUDA build); see the README for a CUDA machine.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
OUT    ?= deploy-out
BIN     = $(VENV)/bin

.PHONY: deploy test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q "$(TORCH)" -e ".[quant,serve]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-run
	$(BIN)/pip install -q "$(TORCH)" -e ".[quant,serve,dev]"
	# vit-pytorch is the reference the tests compare against; its package __init__ needs
	# torchvision, which the CPU torch build lacks, so it is installed without dependencies
	# and the tests load its cross_vit.py file directly.
	$(BIN)/pip install -q --no-deps "vit-pytorch==1.26.11"
	# The real TensorRT runtime bindings (the lean runtime: a real wheel on PyPI, unlike the full
	# builder) and cuda-python, so tests/test_tensorrt.py checks every TensorRT and CUDA runtime
	# name our session uses against them. They import without a GPU; no object is ever created.
	$(BIN)/pip install -q "tensorrt-lean-cu12==11.4.0.106" "cuda-bindings>=12.9"
	touch $@

deploy: $(VENV)/.installed-run
	$(BIN)/crossvit deploy -o $(OUT)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
