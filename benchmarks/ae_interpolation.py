"""How does an autoencoder decode a latent that is partly an object? A test of how linear its latent space is.

    python benchmarks/ae_interpolation.py --vae runs/shapes-dcae/model [--out docs/latent_interpolation.png]

For single objects on a plain background (every shape, three colours the data set paints on that background, large
and small, at the centre), the latent z_bg + a (z_obj - z_bg) is decoded for a = 0, 0.25, 0.5, 0.75, 1. "Visible" is the part of the object that comes
back: the mean of |decoded - background| over the object's pixels, divided by the same for the object's own
render. Blending the two images (pixel space) gives exactly a. A diffusion model's early predictions are averages
of latents; if an average of "object" and "no object" decodes to no object, its samples start from empty backgrounds
and their objects appear late and small (docs/bundled-model.md, sixth round).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from sanaflow.hub import load_dcae
from sanaflow.shapes import SHAPES, Scene, ShapeObject, allowed_colors, render

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def cases(background: str) -> list[tuple[str, str, str]]:
    colors = allowed_colors(background)[:3]      # others never appear on it (shapes.MIN_BACKGROUND_DE)
    return [(shape, color, size) for shape in SHAPES for color in colors for size in ("large", "small")]


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1      # (B, 3, H, W)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", required=True, help="a diffusers AutoencoderDC folder")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--background", default="gray")
    ap.add_argument("--out", default=None, help="a PNG of the first case: decoded latents above, blended images below")
    args = ap.parse_args()
    vae = load_dcae(args.vae).eval()
    background = render(Scene(args.background, ()), args.size)
    todo = cases(args.background)
    objects = [render(Scene(args.background, (ShapeObject(s, c, z, 0.5, 0.5),)), args.size) for s, c, z in todo]
    bg, obj = to_tensor([background]), to_tensor(objects)                                  # (1, 3, H, W), (B, ...)
    z_bg = vae.encode(bg)                                                                   # (1, C, h, w)
    z_obj = torch.cat([vae.encode(o) for o in obj.split(16)])
    mask = (obj - bg).abs().amax(1) > 0.05                                                  # (B, H, W) object pixels
    full = ((obj - bg).abs().mean(1) * mask).sum((1, 2))                                   # (B,)
    visible, rows = [], []
    for a in ALPHAS:
        dec = torch.cat([vae.decode(z_bg + a * (z - z_bg)) for z in z_obj.split(16)]).clamp(-1, 1)
        visible.append(((dec - bg).abs().mean(1) * mask).sum((1, 2)) / full)             # (B,)
        rows.append(dec[0])
    colors = ", ".join(allowed_colors(args.background)[:3])
    print(f"{len(todo)} objects (6 shapes x {colors} x large, small) on {args.background}, {args.size} px, {args.vae}")
    print("| a | " + " | ".join(f"{a:g}" for a in ALPHAS) + " |")
    print("|---|" + "---:|" * len(ALPHAS))
    print("| pixel blend | " + " | ".join(f"{a:.2f}" for a in ALPHAS) + " |")
    for name, sel in (("decoded, all", slice(None)), ("decoded, large", slice(0, None, 2)),
                      ("decoded, small", slice(1, None, 2))):
        print(f"| {name} | " + " | ".join(f"{float(v[sel].mean()):.2f}" for v in visible) + " |")
    if args.out:
        from PIL import Image

        from sanaflow.files import atomic_write
        top = torch.cat(rows, dim=2)                                                         # (3, H, 5W)
        blend = torch.cat([bg[0] + a * (obj[0] - bg[0]) for a in ALPHAS], dim=2)
        sheet = (torch.cat([top, blend], dim=1) * 0.5 + 0.5).permute(1, 2, 0).numpy()
        image = Image.fromarray((sheet * 255).round().astype(np.uint8)).resize((5 * 128, 2 * 128))
        atomic_write(args.out, lambda p: image.save(p, format="PNG"))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
