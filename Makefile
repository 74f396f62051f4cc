# Quick start:  make demo   (set up, then run the whole pipeline on the demo cohort)
#               make test   (set up, then run the test suite)
PYTHON ?= python3
VENV ?= .venv
# The PyTorch build to install (in the same pip call as the package); override on clusters, e.g.
# TORCH="torch torchvision", or TORCH="torch torchvision --extra-index-url URL" for another build.
TORCH ?= torch==2.14.1 torchvision==0.29.1
CORES ?= 2
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: demo test lint bench clean-demo
# Every target: Tables I-III, Figs. 1, 4a-c, 5, ROC, the S->M figure, heatmaps; then the report.
DEMO_TARGETS ?= all ablations wsi_missing analysis
demo: $(VENV)/.installed
	snakemake --profile profiles/default --cores $(CORES) $(DEMO_TARGETS)
	snakemake $(DEMO_TARGETS) --report results/report.html

test: $(VENV)/.installed
	pytest -q

lint: $(VENV)/.installed
	snakemake --lint

bench: $(VENV)/.installed
	for b in benchmarks/*.py; do python $$b || exit 1; done

# One pip resolve for torch and the package. No pip self-upgrade: the venv's own pip (22.3+ with
# Python 3.11+) installs an editable pyproject package. (Not --no-compile: where
# PYTHONDONTWRITEBYTECODE is set, as in many containers, every job would then compile torch anew.)
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q $(TORCH) -e '.[test]'
	touch $@

clean-demo:
	rm -rf results .snakemake
