# Two commands set up everything on a fresh machine: `make train` and `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
export LENET_DATA_DIR ?= ../shared/data

.PHONY: train test install bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

train: install
	$(VENV)/bin/lenet-dist train

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(VENV)/bin/lenet-dist bench

clean:
	rm -rf $(VENV) runs profiles/*/ .pytest_cache
