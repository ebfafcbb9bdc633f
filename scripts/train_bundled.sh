#!/usr/bin/env bash
# The bundled model's recipe (docs/training.md): shapes data, the three trainings, export into the package, and
# the held-out evaluation. Every step resumes: rerun this script after an interruption and it carries on.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/sanaflow ] || { python3 -m venv .venv && .venv/bin/python -m pip install -q "torch==2.13.0" -e .; }
S=.venv/bin/sanaflow
# The same 20000 scenes and captions at two sizes: 256 px for the AE and the DiT, 128 px (quicker to write) for the
# text encoder, which reads only the captions. --grid 8: object centres on the 8 x 8 latent cells' centres.
for size in 256 128; do
  [ -f data/shapes-$size-g8/shapes-000009.tar ] ||
    $S data shapes --out data/shapes-$size-g8 --num 20000 --size $size --shard-size 2000 --grid 8
done
# The held-out split's captions, read only by the text encoder (its "pretraining text"; options.corpus of shapes-text):
# 64 px, as no network sees these images.
[ -f data/shapes-64-heldout/shapes-heldout-000003.tar ] ||
  $S data shapes --held-out --out data/shapes-64-heldout --num 20000 --size 64 --shard-size 5000 --grid 8
$S train --preset shapes-dcae --out runs/shapes-dcae
$S train --preset shapes-text --out runs/shapes-text
$S train --preset shapes-dit --out runs/shapes-dit
# The raw weights (they beat the EMA at every step count) and guidance 2, chosen on the training split: 0.534 at 2,
# 0.488 at 3 (docs/bundled-model.md, fifteenth round; 1.5 and 4.5 scored lower on earlier DiTs).
$S export runs/shapes-dit --out sanaflow/assets/model --dtype float16 --weights raw --guidance 2.0
$S eval --model sanaflow/assets/model --split held-out --images-per-prompt 4 --out runs/eval-held-out
