# make bench: create .venv if missing, install, run the default suite into a fresh runs/<date-time>/
#             and compare every cell with the committed reference (results/); exit 1 on a regression.
# make test:  same set-up, then the tests (slow ones excluded).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Data root: $CL_BAYES_DATA if set, else ../shared/data when present, else cl_bayes' default (download).
CL_BAYES_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export CL_BAYES_DATA
SUITE ?= benchmarks/suites/default.toml
JOBS ?= 2

.PHONY: install bench test test-slow speed plots leaderboard lint clean

$(BIN)/cl-bayes: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1 || $(BIN)/python -m pip install -q torch torchvision
	$(BIN)/python -m pip install -q -e '.[dev,ray]'
	touch $@

install: $(BIN)/cl-bayes

bench: install
	$(BIN)/cl-bayes bench $(SUITE) --jobs $(JOBS)

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

speed: install
	$(BIN)/python -m pytest benchmarks --benchmark-only -q

plots: install
	$(BIN)/cl-bayes plots

leaderboard: install
	$(BIN)/cl-bayes leaderboard

lint: install
	$(BIN)/ruff check cl_bayes tests benchmarks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .benchmarks
