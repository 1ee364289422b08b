#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in $VENV (default .venv) with larp_rt installed
# editable, its PyTorch / training / dev extras, at the exact versions of constraints.txt.
#   EXTRAS   extras to install (default: torch,train,export,video,serve,tensorrt,triton,hub,bench,dev)
#   TRITON   1 (default): also the tritonserver of nvidia-pytriton (tests/test_triton.py); 0: skip it
#   PYTHON   interpreter that creates the venv (default: python3; needs >= 3.10)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-torch,train,export,video,serve,tensorrt,triton,hub,bench,dev}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# torch first and alone, pinned: an unpinned resolve would pull the multi-GB CUDA build on CPU-only machines
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt torch
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[${EXTRAS}]"
# Triton's server for the tests: nvidia-pytriton pins numpy<2, but only its tritonserver binary and python backend
# are used, so it goes in without its dependencies (the project's numpy 2 stays)
if [ "${TRITON:-1}" = "1" ]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt nvidia-pytriton
fi
"$VENV/bin/python" -c "import torch, larp_rt; print(f'larp_rt {larp_rt.__version__} ready in $VENV (torch {torch.__version__})')"
