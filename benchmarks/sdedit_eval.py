"""At which noise level does a text-to-image model lose the picture? The evaluator's pass rate when sampling starts
from a real image's latent noised to t0 (SDEdit, Meng et al. 2022) instead of from pure noise.

Each prompt's scene is rendered (shapes.render via geneval.scene_for), encoded by the pipeline's DC-AE, noised to
x_t0 = (1 - t0) z + t0 noise, sampled back to 0 with the prompt (Euler on the --steps grid, cut at t0; guidance as
the pipeline's default), decoded and checked by the shapes evaluator. t0 = 0 is the autoencoder alone, t0 = 1 plain
sampling. Where the pass rate falls is the noise range the DiT has not learned (docs/bundled-model.md, third round).

    python benchmarks/sdedit_eval.py --model runs/handoff/model-yn1-6000
    python benchmarks/sdedit_eval.py --model FOLDER --split held-out --per-category 20 --t0 0 0.5 1
    python benchmarks/sdedit_eval.py --model FOLDER --grid 8      # a model trained on `data shapes --grid 8`
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from sanaflow.geneval import CATEGORIES, check, detect, prompt_set, scene_for
from sanaflow.pipeline import Pipeline, classifier_free
from sanaflow.samplers import euler, flow_times_euler
from sanaflow.shapes import render


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a pipeline folder")
    ap.add_argument("--split", choices=["train", "held-out"], default="train")
    ap.add_argument("--per-category", type=int, default=8)
    ap.add_argument("--t0", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7, 0.85, 0.95, 1.0])
    ap.add_argument("--steps", type=int, default=40, help="Euler grid over [0, 1]; the part below t0 is used")
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's")
    ap.add_argument("--grid", type=int, default=0, help="object centres on a GRID x GRID lattice, as the model's "
                    "training data (`sanaflow data shapes --grid`); 0: anywhere")
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    if any(not 0 <= t <= 1 for t in args.t0):
        ap.error(f"--t0 {args.t0}: every value must be in [0, 1]")
    torch.set_grad_enabled(False)

    pipe = Pipeline.from_pretrained(args.model)
    size = pipe.native_size
    args.guidance = pipe.guidance if args.guidance is None else args.guidance
    rng = np.random.default_rng(args.seed)
    prompts = prompt_set(args.split == "held-out", args.seed, args.per_category)
    originals = np.stack([render(scene_for(p, rng, grid=args.grid), size) for p in prompts])
    z = pipe.vae.encode(torch.from_numpy(originals).permute(0, 3, 1, 2).float() / 127.5 - 1)
    c = pipe.text.encode_for_cfg([p.text for p in prompts], "", 1)
    model_fn = classifier_free(pipe.dit, c.text, c.text_mask, c.null_text, c.null_mask, args.guidance, True)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(args.seed))
    grid = flow_times_euler(args.steps, pipe.flow_shift)

    print(f"{args.model}: {len(prompts)} {args.split} prompts, one scene each; Euler {args.steps}-step grid from t0, "
          f"guidance {args.guidance}; pass rate on the originals "
          f"{np.mean([check(p, detect(im)) for p, im in zip(prompts, originals)]):.3f}\n")
    cats = [k for k in CATEGORIES if any(p.category == k for p in prompts)]
    print("| t0 | overall | " + " | ".join(cats) + " |")
    print("|---:|---:|" + "---:|" * len(cats))
    for t0 in args.t0:
        x = z
        if t0 > 0:
            x = euler(model_fn, (1 - t0) * z + t0 * noise, torch.cat([torch.tensor([t0]), grid[grid < t0]]))
        images = ((pipe.vae.decode(x).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        passed = {k: [] for k in cats}
        for p, im in zip(prompts, images):
            passed[p.category].append(check(p, detect(im)))
        overall = np.mean([v for vs in passed.values() for v in vs])
        print(f"| {t0:.2f} | {overall:.3f} | " + " | ".join(f"{np.mean(passed[k]):.2f}" for k in cats) + " |",
              flush=True)


if __name__ == "__main__":
    main()
