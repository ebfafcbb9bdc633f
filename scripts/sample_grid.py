"""A grid of samples from a pipeline (default: the bundled model), each captioned with its prompt and seed.

    python scripts/sample_grid.py --out docs/samples.png
    python scripts/sample_grid.py --model runs/pipe --seeds 0 1 --out grid.png

Every image is generated at the CLI's defaults (20 Flow-DPM-Solver steps, the model's guidance); prompts of the
held-out kind (a "disc", a "plus sign", pairs never seen in training) are marked with *.
"""
from __future__ import annotations

import argparse
import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw

from sanaflow.files import atomic_write
from sanaflow.pipeline import GenerateRequest, Pipeline, load_default

PROMPTS = (
    "a red circle to the left of a blue square",
    "three yellow stars on a black background",
    "a large green triangle above a small purple hexagon",
    "two orange crosses and a blue circle on a gray background",
    "a blue star to the right of a pink square",
    "a photo of a brown disc",                          # held out: "disc", "a photo of"
    "four plus signs",                                  # held out: "plus sign"
    "a green star above a pink hexagon",                # held out: both colour-shape pairs
)
HELD_OUT = {5, 6, 7}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a pipeline folder (default: the bundled model)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--columns", type=int, default=4)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    pipe = Pipeline.from_pretrained(args.model) if args.model else load_default()
    size, label = pipe.native_size, 44
    jobs = [(i, p, s) for i, p in enumerate(PROMPTS) for s in args.seeds]
    cols = args.columns
    rows = -(-len(jobs) // cols)
    sheet = Image.new("RGB", (cols * size, rows * (size + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (i, prompt, seed) in enumerate(jobs):
        req = GenerateRequest(prompts=(prompt,), height=size, width=size, seeds=(seed,))
        image = (pipe.generate(req)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        x, y = (k % cols) * size, (k // cols) * (size + label)
        sheet.paste(Image.fromarray(image), (x, y))
        text = ("* " if i in HELD_OUT else "") + prompt + f" (seed {seed})"
        draw.multiline_text((x + 4, y + size + 2), "\n".join(textwrap.wrap(text, 42)[:3]), fill="black")
    atomic_write(args.out, lambda p: sheet.save(p, format="PNG"))
    print(f"wrote {args.out}: {len(jobs)} samples of {pipe.name}")


if __name__ == "__main__":
    main()
