#!/usr/bin/env bash
# Create .venv (CPU torch), install sanaflow, generate one image: scripts/generate.sh ["PROMPT"] [sanaflow generate options]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" -e .
prompt="${1:-a red circle to the left of a blue square}"
shift || true
exec .venv/bin/sanaflow generate "$prompt" -o sanaflow.png "$@"
