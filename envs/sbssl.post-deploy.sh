#!/usr/bin/env bash
# Snakemake runs this once, inside the environment it has just created from envs/sbssl.yaml ($CONDA_PREFIX),
# from a copy in the conda prefix: the script's own path says nothing about the checkout, hence SBSSL_ROOT
# (the Snakefile exports workflow.basedir). --no-deps: every dependency comes from sbssl.yaml, which
# tests/test_envs.py keeps in step with pyproject.toml. -e: jobs import the checkout's current code.
set -euo pipefail
: "${SBSSL_ROOT:?is not set; run the workflow through its Snakefile, which exports SBSSL_ROOT (workflow.basedir)}"
if [ ! -f "$SBSSL_ROOT/pyproject.toml" ] || [ ! -d "$SBSSL_ROOT/sbssl" ]; then
    echo "SBSSL_ROOT=$SBSSL_ROOT is not an sbssl checkout (no pyproject.toml and sbssl/ there)" >&2
    exit 1
fi
python -m pip install --no-deps --no-input -e "$SBSSL_ROOT"
