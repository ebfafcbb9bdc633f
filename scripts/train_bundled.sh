#!/usr/bin/env bash
# The bundled model's recipe (docs/training.md): shapes data, the three trainings, export into the package, and
# the held-out evaluation. Every step resumes: rerun this script after an interruption and it carries on.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/sanaflow ] || { python3 -m venv .venv && .venv/bin/python -m pip install -q "torch==2.13.0" -e .; }
S=.venv/bin/sanaflow
# The same 20000 scenes and captions at two sizes: 256 px for the AE and the DiT, 128 px (quicker to write) for the
# text encoder, which reads only the captions.
[ -f data/shapes-256/shapes-000009.tar ] || $S data shapes --out data/shapes-256 --num 20000 --size 256 --shard-size 2000
[ -f data/shapes-128/shapes-000009.tar ] || $S data shapes --out data/shapes-128 --num 20000 --size 128 --shard-size 2000
$S train --preset shapes-dcae --out runs/shapes-dcae
$S train --preset shapes-text --out runs/shapes-text
$S train --preset shapes-dit --out runs/shapes-dit
$S export runs/shapes-dit --out sanaflow/assets/model --dtype float16
$S eval --model sanaflow/assets/model --split held-out --images-per-prompt 4 --out runs/eval-held-out
