# Two entry points, each creating .venv and installing what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,plot]'
	touch $@

demo: $(VENV)/.base
	$(PY) -m pip install -q -e '.[plot]'
	$(PY) -m tx demo

test: $(VENV)/.test
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(VENV)/.test
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
