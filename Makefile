# Two set-up commands: `make demo` and `make test`. Both create .venv and install what they need,
# quickly when it is already there (a stamp file per requirements file).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
WORKERS ?= 3
ROUNDS  ?= 5

.PHONY: demo test check lint venv dev clean-run

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: requirements.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements-dev.txt $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-dev.txt
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

lint: dev
	$(PY) -m ruff check .

clean-run:  # forget every run (including the stored one a restarted coordinator would resume)
	rm -rf models/*.pt models/demo logs/*.log logs/*.out logs/*.png logs/demo temp/*
