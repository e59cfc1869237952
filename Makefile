# The two commands: `make demo` and `make test`. Both bootstrap .venv idempotently.
# torch is installed FIRST from TORCH_SPEC (the local CPU wheel by default; e.g. TORCH_SPEC="torch==2.13.0"
# with a CUDA index for GPU users), then the package with torch pinned by a constraint so nothing replaces it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.stamp-install
DEMO_OUT ?= runs/demo

.PHONY: install test lint demo clean

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

test: lint
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/adafuse run configs/sequence/bbc-topics.yaml --out $(DEMO_OUT)/sequence
	$(BIN)/adafuse fuse configs/fusion/bbc-topic5-fewshot.yaml --library $(DEMO_OUT)/sequence/library \
		--out $(DEMO_OUT)/fusion
	$(BIN)/adafuse fuse configs/fusion/bbc-topic5-fewshot.yaml --library $(DEMO_OUT)/sequence/library \
		--out $(DEMO_OUT)/single-adapter --baseline single-adapter
	$(BIN)/adafuse report $(DEMO_OUT)/sequence $(DEMO_OUT)/fusion $(DEMO_OUT)/single-adapter --out $(DEMO_OUT)
	$(BIN)/python -m adafuse.continual.summary $(DEMO_OUT)

clean:
	rm -rf $(VENV) runs
