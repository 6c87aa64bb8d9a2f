# Two set-up commands: `make demo` and `make test`. Both create .venv and install what they need,
# quickly when it is already there (a stamp file per requirements file).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
WORKERS ?= 3
ROUNDS  ?= 5

.PHONY: demo test check lint venv dev mutate mutation-report clean-run

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: requirements.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements-dev.txt $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(VENV)/.installed-mutate: requirements-mutate.txt $(VENV)/.installed-dev
	$(PY) -m pip install --quiet -r requirements-mutate.txt
	touch $@

venv: $(VENV)/.installed

dev: $(VENV)/.installed-dev

demo: venv
	$(PY) launch.py --workers $(WORKERS) --rounds $(ROUNDS) --cpu

test: dev
	@scripts/ensure-chromium.sh
	$(PY) -m pytest

check: dev  # the inner loop: lint + every test but the end-to-end and browser ones (~3 min)
	$(PY) -m pytest -m "not e2e" --ignore=tests/test_dashboard.py

# Mutation testing (CONTRIBUTING.md): mutmut changes the silent modules one mutant at a time and runs the unit tests
# that reach each change; an hour or more on 2 cores the first time, then only what changed. Not in make test.
# MUTANTS='fedrest.privacy.*' limits a run to the mutants of one module (or function). OMP_NUM_THREADS=1: a
# process forked after torch's OpenMP pool started hangs in its first parallel region.
mutate: $(VENV)/.installed-mutate
	OMP_NUM_THREADS=1 $(PY) -m mutmut run --max-children $(shell nproc 2>/dev/null || echo 2) $(MUTANTS)
	$(PY) scripts/mutation_report.py

mutation-report: $(VENV)/.installed-mutate  # the last run's score per module and its surviving mutants
	$(PY) scripts/mutation_report.py --survivors

lint: dev
	$(PY) -m ruff check .

clean-run:  # forget every run (including the stored one a restarted coordinator would resume)
	rm -rf models/*.pt models/demo logs/*.log logs/*.out logs/*.png logs/demo temp/*
