# CalciMap: `make demo` and `make test` each set up .venv first, so on a fresh machine each is one command.
SHELL := scripts/stack_shell.sh
.SHELLFLAGS := -eo pipefail -c

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Where torch comes from. Empty: the default index (on our machines a local CPU wheel). On another
# CPU-only host use PyTorch's CPU index (TORCH_INDEX=https://download.pytorch.org/whl/cpu); on a GPU
# host its CUDA index with TORCH_CUDA set to that CUDA version (e.g. 12.8). Setup checks what arrived.
TORCH_INDEX ?=
TORCH_CUDA ?=
TORCH_VERSION := $(shell sed -n 's/^torch==//p' requirements.txt)
STAMP := $(VENV)/.installed

.PHONY: setup data models demo test lint format clean
setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -c "import torch, sys; got = torch.version.cuda or ''; want = '$(TORCH_CUDA)'; \
	  sys.exit(0 if got == want else f'setup: torch {torch.__version__} has CUDA {got or None}, asked for {want or None}: set TORCH_INDEX/TORCH_CUDA')"
	touch $(STAMP)

data: setup
	$(PY) scripts/make_phantoms.py chest --num 40 --out data/chest_small --size small --dicom --unlabeled-fraction 0.5 --workers 2
	$(PY) scripts/make_phantoms.py head --num 40 --out data/head_small --size small --dicom --workers 2
	$(PY) scripts/make_phantoms.py lung --num 30 --out data/lung_small_raw --size small --workers 2
	$(PY) scripts/prepare_clean_cc_ccii.py --raw-root data/lung_small_raw --out data/lung_small --workers 2

# TorchScript exports of the bundles' weights for the app (models/<name>/model.ts) and their sha256 manifest;
# both are committed, so run this after retraining a bundle.
models: setup
	$(PY) scripts/export_models.py

demo: setup
	$(PY) scripts/demo.py --out output/demo

test: setup lint
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf output .pytest_cache .ruff_cache
