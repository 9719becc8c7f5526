# Two entry points (README): `make deploy` runs the main job, `make test` the test suite.
# Both create .venv and install the CPU build of torch 2.13.0 first (an unpinned torch pulls
# a multi-GB CUDA build); see the README for a CUDA machine.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
OUT    ?= deploy-out
BIN     = $(VENV)/bin

.PHONY: deploy test install clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)" -e ".[dev,quant]"
	# vit-pytorch is the reference the tests compare against; its package __init__ needs
	# torchvision, which the CPU torch build lacks, so only its files are installed.
	$(BIN)/pip install -q --no-deps "vit-pytorch==1.26.11"
	touch $@

install: $(BIN)/.installed

deploy: $(BIN)/.installed
	$(BIN)/crossvit deploy -o $(OUT)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
