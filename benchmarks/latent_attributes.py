"""How far does an autoencoder's latent move when one attribute of an object changes? Loud and quiet attributes.

    python benchmarks/latent_attributes.py --vae runs/shapes-dcae-s/model runs/shapes-dcae-a/model [--pairs 64]

For `pairs` random single objects (medium size, on a random background, centre drawn where every variant fits), each
attribute is changed alone: the colour (to another the data set paints on that background), the shape, the size
(to large), the position (by 4 px and by 16 px to the right), or the object is removed. The table gives the mean
distance |z - z'| between the two latents, in the DiT's unit-variance scale (the AE's scaling factor applied), over
the whole 8 x 8 x 32 latent, and its ratio to the 4 px shift.

A diffusion model's loss is a distance in this space. An attribute that moves the latent less than a few pixels of
position is one the loss barely rewards and that the model's small errors change: the DiT must get the caption's
colour right from a signal the size of a 4 px shift (docs/bundled-model.md, eighth round). In pixels, recolouring a
medium object changes ~2000 pixels by the whole colour difference; a 4 px shift changes ~400 edge pixels.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from sanaflow.hub import load_dcae
from sanaflow.shapes import (
    BACKGROUNDS,
    EDGE_MARGIN,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    allowed_colors,
    render,
)

CHANGES = ("colour", "shape", "size", "shift 4 px", "shift 16 px", "removed")


def variants(rng: np.random.Generator, size: int) -> list[Scene]:
    """One object and its CHANGES, in that order."""
    bg = str(rng.choice(list(BACKGROUNDS)))
    c0, c1 = (str(c) for c in rng.choice(allowed_colors(bg), 2, replace=False))
    s0, s1 = (str(s) for s in rng.choice(SHAPES, 2, replace=False))
    r = SIZES["large"] / 2 + EDGE_MARGIN                     # room for the large variant and the 16 px shift
    x, y = rng.uniform(r, 1 - r - 16 / size), rng.uniform(r, 1 - r)

    def one(shape=s0, color=c0, sz="medium", dx=0.0):
        return Scene(bg, (ShapeObject(shape, color, sz, x + dx, y),))
    return [one(), one(color=c1), one(shape=s1), one(sz="large"), one(dx=4 / size), one(dx=16 / size),
            Scene(bg, ())]


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", nargs="+", required=True, help="diffusers AutoencoderDC folders")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    scenes = [variants(rng, args.size) for _ in range(args.pairs)]
    k = len(CHANGES) + 1
    x = torch.from_numpy(np.stack([render(s, args.size) for group in scenes for s in group]))
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1                            # (pairs * k, 3, H, W)
    print(f"{args.pairs} objects, {args.size} px; mean |z - z'| over the whole latent (unit-variance scale), "
          f"and its ratio to the 4 px shift\n")
    print("| autoencoder | " + " | ".join(CHANGES) + " |")
    print("|---|" + "---:|" * len(CHANGES))
    for folder in args.vae:
        vae = load_dcae(folder)
        z = torch.cat([vae.encode(b) for b in x.split(64)]).reshape(args.pairs, k, -1)   # scaled latents
        dist = (z[:, 1:] - z[:, :1]).norm(dim=2).mean(0)                              # (k - 1,)
        ref = dist[CHANGES.index("shift 4 px")]
        print(f"| {folder} | " + " | ".join(f"{d:.1f} ({d / ref:.1f}x)" for d in dist.tolist()) + " |")


if __name__ == "__main__":
    main()
