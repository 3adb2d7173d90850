# Everything goes through the virtual environment in .venv; `make install` creates it when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch and torchvision are installed first and pinned, so that pip does not pick another build.
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# The checkpoint `make serve` and `make bench-serve` use: last | <run dir> | <file.ckpt>
CKPT ?= last

.PHONY: install data train test test-full bench lint format tensorboard notebook clean slurm-up slurm-down serve bench-serve chromium

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'  # dev includes the export, sweeps, slurm, tracking and notebooks extras
	touch $@

data: install
	$(PY) -m digit_lightning.data

train: data  ## the tutorial's settings: Digit CNN, Adam, batch 16, 10 epochs
	$(PY) -m digit_lightning.train $(ARGS)

test: install data  ## the fast suite: in process, on synthetic digits and a few real-MNIST slices (~56 s on 2 cores)
	$(PY) -m pytest -m "not slow" -n auto --dist loadfile --no-loadscope-reorder $(ARGS)

test-full: install data  ## everything, as CI runs it (slow tests included; SLURM tests need `make slurm-up`)
	$(PY) -m pytest $(ARGS)

bench: data  ## tutorial script vs ours, plain PyTorch vs experiment=fast, import time, per-step logging cost (ARGS=--quick: a few minutes; --imports; --profile: where a step's CPU time goes)
	$(PY) bench/bench.py $(ARGS)

serve: install  ## the model over HTTP on 127.0.0.1:8000 and a page to draw digits on (CKPT=last; ARGS=port=8080 ...)
	$(PY) -m digit_lightning.serve ckpt_path=$(CKPT) $(ARGS)

bench-serve: data  ## load test of `make serve` on 127.0.0.1: 8, then 32 clients for 30 s each, with the CPU model (CKPT=last)
	$(PY) bench/serve_load.py --ckpt $(CKPT) $(ARGS)

chromium:  ## Debian's chromium, for the browser test of the drawing page (root: installs it with apt-get if missing)
	@command -v chromium >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/nbstripout notebooks/*.ipynb

slurm-up:  ## a one-node SLURM cluster on this machine, for the slurm tests (root: installs it with apt-get if missing)
	scripts/slurm.sh up

slurm-down:
	scripts/slurm.sh down

tensorboard: install
	$(PY) -m tensorboard.main --logdir logs

notebook: data  ## JupyterLab on notebooks/ (the [notebooks] extra), on this machine only
	$(PY) -m jupyterlab --notebook-dir=notebooks --ServerApp.ip=127.0.0.1 $(ARGS)

clean:
	rm -rf logs outputs multirun .pytest_cache .ruff_cache dist build
	find . -name __pycache__ -prune -exec rm -rf {} +
