# The two commands of the README. Both create .venv when missing and install what they need.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: demo test bench lint clean system-deps

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

# The closed loop on the embedded demo web: curation, tiny pretraining, k-NN, curation again with the
# trained teacher; ends with a summary table and runs/demo/report/index.html (docs/evaluation.md).
demo: $(VENV)/.installed
	$(VPY) -m pipelines.closed_loop --out runs/demo --iterations 1200

# Debian packages the tests use: headless Chromium opens the HTML reports; SLURM and munge run the
# one-node cluster of the tests marked slurm (tests/slurm starts and stops it: slurm/local_cluster.sh).
system-deps:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: chromium is missing and cannot be installed here; browser tests will skip"; fi; }
	@{ command -v slurmctld && command -v slurmd && command -v munged; } >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; \
	  else echo "note: SLURM is missing and cannot be installed here; SLURM tests will skip"; fi; }

test: $(VENV)/.installed-dev system-deps
	$(VPY) -m pytest

bench: $(VENV)/.installed-dev
	$(VPY) bench/ingest.py

lint: $(VENV)/.installed-dev
	$(VPY) -m ruff check .

clean:
	rm -rf runs
