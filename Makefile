# Two commands set up everything on a fresh machine: `make run` (main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml tools/setup.sh tools/constraints.txt
	bash tools/setup.sh $(VENV)
	touch $@

.PHONY: run test lint
run: $(VENV)/.installed
	$(VENV)/bin/mist-peft continual

test: $(VENV)/.installed
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
