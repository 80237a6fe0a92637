# Two entry points on a fresh machine (see README):
#   make demo   install everything into .venv and sample digits from the embedded model
#   make test   install the test extras too and run the test suite
# TORCH picks the torch build: the CPU build by default (on this project's machines it comes from
# the local disk). For a CUDA build: make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
PYTEST_ARGS ?= -q

.PHONY: install demo test bench nightly clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=70.1" wheel ninja
	$(BIN)/python -m pip install -q $(TORCH)
	# --no-build-isolation: build against the torch just installed, not a fresh download
	$(BIN)/python -m pip install -q --no-build-isolation -e .

demo: install
	$(BIN)/ddpm-perf sample --out digits.png

test: install
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	@# pytest exits 5 when it collects nothing: a missing suite is a failure, said plainly.
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite is missing" >&2; exit 1; fi; exit $$rc

bench: install
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	$(BIN)/python -m pytest benchmarks --benchmark-only --benchmark-autosave

# The nightly regression run (benchmarks/nightly.py): runs the suites, saves to .benchmarks/, compares
# with the last good run (exit 3 on a regression), writes reports/report.md and report.png.
# e.g. make nightly NIGHTLY_ARGS="--threshold 15 -- -m 'not compile'"
NIGHTLY_ARGS ?=
nightly: install
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	$(BIN)/python benchmarks/nightly.py $(NIGHTLY_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
