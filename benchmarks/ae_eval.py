"""How much of a shapes image survives the autoencoder: the evaluator's pass rate and PSNR on reconstructions.

Renders held-out GenEval-style prompts (scene_for: scenes never trained on, including the held-out
colour-shape pairs), reconstructs each through the DC-AE (encode, decode), and runs the shapes evaluator
(detect + check) on original and reconstruction. Reports, per category and overall: pass rate on originals, on
reconstructions, their ratio (issue target: >= 0.97), and PSNR (target: >= 30 dB, on [0, 1] images).

    python benchmarks/ae_eval.py --vae runs/shapes-dcae/model --size 128
    python benchmarks/ae_eval.py --vae sanaflow/assets/model/vae --size 128 --per-category 20 --scenes 1
    python benchmarks/ae_eval.py --vae runs/shapes-dcae-s/model --size 256 --keep-channels 8

--keep-channels C decodes from the latent's first C channels only, the rest zeroed: what the front channels of a
structured latent (DCAEOptions.keep_channels, DC-AE 1.5) carry on their own.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from sanaflow.geneval import CATEGORIES, check, detect, prompt_set, scene_for
from sanaflow.hub import load_dcae
from sanaflow.shapes import render


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", required=True, help="a diffusers AutoencoderDC folder")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--per-category", type=int, default=50, help="held-out prompts per category (at most)")
    ap.add_argument("--scenes", type=int, default=2, help="random scenes rendered per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--latent-noise", type=float, default=0.0,
                    help="decode z + sigma * eps instead of z (z in the DiT's unit-variance scale): how much of a "
                         "latent's imprecision the decoder tolerates, a proxy for the DiT's sample error")
    ap.add_argument("--keep-channels", type=int, default=0,
                    help="decode from the latent's first C channels only, the others zeroed (0: all)")
    ap.add_argument("--grid", type=int, default=0,
                    help="render scenes with centres on a GRID x GRID lattice, as `sanaflow data shapes --grid`")
    args = ap.parse_args()

    vae = load_dcae(args.vae).eval()
    rng = np.random.default_rng(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    prompts = prompt_set(held_out=True, seed=args.seed, per_category=args.per_category)
    jobs = [(p, render(scene_for(p, rng, grid=args.grid), args.size))
            for p in prompts for _ in range(args.scenes)]
    start = time.perf_counter()
    recons, psnrs = [], []
    with torch.no_grad():
        for i in range(0, len(jobs), args.batch):
            x = torch.from_numpy(np.stack([im for _, im in jobs[i:i + args.batch]])).permute(0, 3, 1, 2).float()
            z = vae.encode(x / 127.5 - 1)
            z = z + args.latent_noise * torch.randn(z.shape, generator=g) if args.latent_noise else z
            if args.keep_channels:
                z[:, args.keep_channels:] = 0
            y = vae.decode(z).clamp(-1, 1)
            out = ((y + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            mse = ((y + 1) / 2 - x / 255).square().flatten(1).mean(1).clamp_min(1e-10)
            psnrs += (-10 * torch.log10(mse)).tolist()
            recons += list(out)
    seconds = time.perf_counter() - start
    rows = {c: [0, 0, 0] for c in CATEGORIES}
    for (p, im), rec in zip(jobs, recons):
        r = rows[p.category]
        r[0] += 1
        r[1] += check(p, detect(im))
        r[2] += check(p, detect(rec))
    noise = f", latent noise sigma {args.latent_noise}" if args.latent_noise else ""
    noise += f", decoded from the first {args.keep_channels} channels" if args.keep_channels else ""
    noise += f", centres on a {args.grid} x {args.grid} grid" if args.grid else ""
    print(f"{args.vae} at {args.size} px: {len(jobs)} held-out renders ({len(prompts)} prompts x {args.scenes} "
          f"scenes, seed {args.seed}{noise}); encode+decode {len(jobs) / seconds:.1f} img/s\n")
    print("| category | n | pass, originals | pass, reconstructions | ratio |")
    print("|---|---:|---:|---:|---:|")
    total = [0, 0, 0]
    for c, (n, a, b) in rows.items():
        if n:
            print(f"| {c} | {n} | {a / n:.3f} | {b / n:.3f} | {b / max(a, 1):.3f} |")
            total = [t + v for t, v in zip(total, (n, a, b))]
    n, a, b = total
    print(f"| **overall** | {n} | {a / n:.3f} | {b / n:.3f} | **{b / max(a, 1):.3f}** |")
    print(f"\nPSNR (dB): mean {statistics.mean(psnrs):.2f}, median {statistics.median(psnrs):.2f}, "
          f"min {min(psnrs):.2f}")


if __name__ == "__main__":
    main()
