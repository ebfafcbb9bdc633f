#!/usr/bin/env bash
# Create .venv (CPU torch), install sanaflow with its dev extras, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned to the CPU build that installs from this machine's local disk; an unpinned torch pulls CUDA.
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[dev]"
exec .venv/bin/python -m pytest -q -m "not slow" "$@"
