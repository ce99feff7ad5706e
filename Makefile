# The two commands of the README. Both create .venv when missing and install what they need.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: demo test bench lint clean

$(VPY):
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is needed"'
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(VPY) pipelines/build_lvd.py --seeds demo --out runs/demo

test: $(VENV)/.installed-dev
	$(VPY) -m pytest

bench: $(VENV)/.installed-dev
	$(VPY) bench/ingest.py

lint: $(VENV)/.installed-dev
	$(VPY) -m ruff check .

clean:
	rm -rf runs
