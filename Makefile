# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv when needed
# and reinstall only when pyproject.toml changed (the stamp file), so repeated calls are fast.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2

.PHONY: demo test test-fast lint clean-demo bench bench-debias bench-gpu

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --configfile config/demo.yaml --cores $(CORES)
	$(BIN)/snakemake --configfile config/demo.yaml --report results/demo/report.html

test: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest

test-fast: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -m "not slow and not slurm"

lint: $(STAMP)
	$(BIN)/snakemake --lint

# Benchmarks (minutes; figures and dates in README.md, "Benchmarks"). `bench` runs on any machine (CPU);
# `bench-gpu` needs a CUDA GPU and the stimuli at ../shared/ieat/stimuli (or STIMULI=/path).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_stats.py
	$(BIN)/python benchmarks/bench_similarity.py
	$(BIN)/python benchmarks/bench_embed.py --device cpu --limit 16
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python benchmarks/bench_dag.py

bench-debias: $(STAMP)
	$(BIN)/python benchmarks/bench_debias.py

bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/bench_embed.py --device cuda --batch-size 64 $(if $(STIMULI),--stimuli $(STIMULI))
