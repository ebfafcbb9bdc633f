"""The paper's solver claim on a trained model: Flow-Euler vs Flow-DPM-Solver at 5 ... 50 steps.

For held-out GenEval-style prompts and fixed seeds, each sampler generates at each step count from the same initial
noise. Two figures per cell:
  - latent error: RMS difference of the final latents from a 100-step Flow-DPM-Solver reference (the same
    prompts, seeds and guidance), relative to the reference's RMS;
  - evaluator score: the shapes evaluator's pass rate on the decoded images.
The 100-step reference is the ODE solution both samplers approach (benchmarks/solver_error.py shows both
converge to the exact solution on a closed-form flow).

    python benchmarks/solver_trained.py                                   # the bundled model
    python benchmarks/solver_trained.py --model runs/pipe --per-category 10 --steps 5 10 20
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sanaflow.geneval import evaluate, prompt_set
from sanaflow.pipeline import GenerateRequest, Pipeline, load_default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a pipeline folder (default: the bundled model)")
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 10, 14, 20, 28, 50])
    ap.add_argument("--reference-steps", type=int, default=100)
    ap.add_argument("--per-category", type=int, default=8, help="held-out prompts per category (at most)")
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    pipe = Pipeline.from_pretrained(args.model) if args.model else load_default()
    size = pipe.native_size
    args.guidance = pipe.guidance if args.guidance is None else args.guidance
    prompts = prompt_set(held_out=True, seed=args.seed, per_category=args.per_category)
    jobs = [(p, args.seed + i * args.images_per_prompt + j)
            for i, p in enumerate(prompts) for j in range(args.images_per_prompt)]

    def run(sampler: str, steps: int) -> tuple[torch.Tensor, list[np.ndarray]]:
        latents, images = [], []
        for s in range(0, len(jobs), args.batch):
            chunk = jobs[s:s + args.batch]
            req = GenerateRequest(prompts=tuple(p.text for p, _ in chunk), height=size, width=size, steps=steps,
                                  guidance=args.guidance, sampler=sampler, seeds=tuple(seed for _, seed in chunk))
            z = pipe.generate(req, output="latent")
            latents.append(z)
            x = (pipe.vae.decode(z.to(next(pipe.vae.parameters()).dtype)).float() * 0.5 + 0.5).clamp(0, 1)
            images += list((x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
        return torch.cat(latents), images

    def score(images: list[np.ndarray]) -> float:
        by_prompt: dict[int, list] = {}
        for k, im in enumerate(images):
            by_prompt.setdefault(k // args.images_per_prompt, []).append(im)
        return evaluate([(prompts[i], ims) for i, ims in by_prompt.items()]).overall

    start = time.perf_counter()
    ref, ref_images = run("dpm", args.reference_steps)
    ref_rms = ref.square().mean().sqrt()
    print(f"model {pipe.name}, {size} px; {len(prompts)} held-out prompts x {args.images_per_prompt} images "
          f"(seeds {args.seed}..{args.seed + len(jobs) - 1}), guidance {args.guidance}; reference: "
          f"{args.reference_steps}-step Flow-DPM-Solver, evaluator score {score(ref_images):.3f}\n")
    print("| steps | Euler: latent error | Euler: score | DPM-Solver: latent error | DPM-Solver: score |")
    print("|---:|---:|---:|---:|---:|")
    for steps in args.steps:
        cells = []
        for sampler in ("euler", "dpm"):
            z, images = run(sampler, steps)
            cells += [f"{((z - ref).square().mean().sqrt() / ref_rms).item():.3f}", f"{score(images):.3f}"]
        print(f"| {steps} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
