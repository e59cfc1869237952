# The two commands: `make demo` and `make test`. Both bootstrap .venv idempotently.
# torch is installed FIRST from TORCH_SPEC (the local CPU wheel by default), then the package with torch
# pinned by a constraint so nothing replaces it. On a GPU machine (README, "GPU"):
#   TORCH_SPEC="torch==2.13.0" PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128 make test
#   VENV=/opt/conda TORCH_SPEC=torch make test      # install into an existing environment that has CUDA torch
#   ACCELERATOR=gpu PRECISION=bf16-mixed make demo
#   PYTEST_ARGS="-n 8 --dist loadgroup" make test   # pytest-xdist workers (default: one per core)
# Offline, pip reads PIP_NO_INDEX=1 and PIP_FIND_LINKS=DIR_OF_WHEELS from the environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.stamp-install
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?= -n auto --dist loadgroup  # pytest-xdist: a worker per core, a file's shared fixtures built once
ACCELERATOR ?= cpu
PRECISION ?= 32-true
TRAINER := --trainer.accelerator $(ACCELERATOR) --trainer.precision $(PRECISION)

.PHONY: install test lint docs demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# the docs site (docs/, MkDocs + Material): reference and benchmark pages generated from the code and the records
docs: install
	$(BIN)/python docs/generate.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

test: lint
	$(BIN)/python docs/generate.py --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: install
	$(BIN)/adafuse run configs/sequence/bbc-topics.yaml --out $(DEMO_OUT)/sequence $(TRAINER)
	$(BIN)/adafuse fuse configs/fusion/bbc-topic5-fewshot.yaml --library $(DEMO_OUT)/sequence/library \
		--out $(DEMO_OUT)/fusion $(TRAINER)
	$(BIN)/adafuse fuse configs/fusion/bbc-topic5-fewshot.yaml --library $(DEMO_OUT)/sequence/library \
		--out $(DEMO_OUT)/single-adapter --baseline single-adapter $(TRAINER)
	$(BIN)/adafuse report $(DEMO_OUT)/sequence $(DEMO_OUT)/fusion $(DEMO_OUT)/single-adapter --out $(DEMO_OUT)
	$(BIN)/python -m adafuse.continual.reporting.summary $(DEMO_OUT)

clean:
	rm -rf .venv runs site  # never $(VENV): it may name an environment adafuse did not create
