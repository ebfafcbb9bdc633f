"""How far is a trained DiT from the best possible denoiser? The exact one is known for one-object captions.

    python benchmarks/denoiser_gap.py --model runs/handoff/s [--grid 32 --scenes 8 --samples 6]
    python benchmarks/denoiser_gap.py --write-data data/four-256 --num 4000    # a training set of these captions only
    python benchmarks/denoiser_gap.py --model runs/handoff/s --attributes     # what knowing each attribute is worth

A caption that names one object's size, colour, shape and background ("a large blue hexagon on a white background")
leaves only the object's position open, and the shapes generator draws it uniformly (shapes._place). The caption's
scenes are rendered with the object centre on a grid x grid lattice over that square and encoded; with that finite set
as the data, the optimal denoiser is exact (sana-spec §4.1 convention, x_t = (1 - t) z + t eps):

    E[z | x_t] = sum_i w_i z_i,  w = softmax_i(-|x_t - (1 - t) z_i|^2 / (2 t^2)),  v* = (x_t - E[z | x_t]) / t.

For `scenes` scenes of each caption at random positions (off the lattice) and fixed noise, the table gives the mean
squared error of the DiT's velocity against the target noise - z, next to that of v*, per t: the gap the DiT could
still close. (v* is exact for the lattice, not for the continuum of positions; at t <= 0.5 its posterior sits on
the nearest lattice points, so its error there is a floor set by the lattice spacing.) Then both denoisers sample
`samples` images per caption from the same noise (20 Flow-DPM-Solver steps, no guidance), and the shapes evaluator
checks for exactly one object of the caption's shape and colour: the exact denoiser's pass rate tests the sampler and
the autoencoder, the DiT's what it has learned (docs/bundled-model.md, seventh round).

--attributes: for the first caption only, the exact denoiser's error when one attribute is not known (the data set is
the union of the lattices of every value of that attribute), next to the exact one's: how much the flow-matching loss
rewards a model for reading that attribute from the caption, per t (docs/bundled-model.md, eighth round).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from sanaflow import shapes
from sanaflow.geneval import EvalPrompt, Item, Requirement, check, detect
from sanaflow.pipeline import Pipeline, dit_velocity, initial_noise
from sanaflow.samplers import dpm_solver_2m, flow_times
from sanaflow.shapes import SIZES, Scene, ShapeObject, allowed_colors, render

CASES = (("hexagon", "blue", "large", "white"), ("star", "red", "medium", "gray"),
         ("circle", "green", "small", "black"), ("triangle", "purple", "large", "beige"))
TIMES = (0.5, 0.7, 0.8, 0.85, 0.9, 0.95)


def exact_velocity(z: torch.Tensor):
    """v* for the data set z (M, C, h, w): the posterior mean over its members, per row of x."""
    flat = z.flatten(1)                                                       # (M, D)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t, xf = t.view(-1, 1), x.flatten(1)                                   # (B, 1), (B, D)
        # |x - (1 - t) z_i|^2, expanded; the |x|^2 term is the same for every i and cancels in the softmax
        d = (1 - t) ** 2 * flat.square().sum(1)[None] - 2 * (1 - t) * (xf @ flat.T)      # (B, M)
        w = torch.softmax(-d / (2 * t * t), 1)                                # (B, M)
        return (x - (w @ flat).view_as(x)) / t.view(-1, 1, 1, 1)
    return model_fn


def caption(case: tuple[str, str, str, str]) -> str:
    shape, color, size, bg = case
    return f"a {size} {color} {shape} on a {bg} background"


def centre_range(size: str) -> tuple[float, float]:
    """Where the generator may put an object's centre, per axis (shapes._place)."""
    r = SIZES[size] / 2
    return r + shapes.EDGE_MARGIN, 1 - r - shapes.EDGE_MARGIN


def scene(case: tuple[str, str, str, str], x: float, y: float) -> Scene:
    shape, color, size, bg = case
    return Scene(bg, (ShapeObject(shape, color, size, float(x), float(y)),))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_data(folder: str, num: int, seed: int) -> None:
    """`num` scenes of the CASES captions in turn, each with its caption only, at uniform positions (WebDataset)."""
    from sanaflow.data import write_wds
    rng = np.random.default_rng(seed)

    def scenes():
        for i in range(num):
            case = CASES[i % len(CASES)]
            s = scene(case, *rng.uniform(*centre_range(case[2]), 2))
            yield render(s, 256), {"captions": [{"text": caption(case), "score": 1.0}], "scene": s.to_dict()}
    write_wds(scenes(), folder, shard_size=1000)
    print(f"wrote {num} scenes to {folder}")


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a pipeline folder (sanaflow export)")
    ap.add_argument("--grid", type=int, default=32, help="object centres per side of the lattice")
    ap.add_argument("--scenes", type=int, default=8, help="test scenes per caption for the losses")
    ap.add_argument("--samples", type=int, default=6, help="images sampled per caption by each denoiser")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="a PNG of every caption's samples: the exact denoiser's row above "
                                                "the DiT's")
    ap.add_argument("--attributes", action="store_true", help="instead: the exact denoiser's error for the first "
                                                                   "caption with each attribute unknown")
    ap.add_argument("--write-data", default=None, help="instead: write a training set of the CASES captions here")
    ap.add_argument("--num", type=int, default=4000, help="scenes for --write-data")
    args = ap.parse_args()
    if args.write_data:
        return write_data(args.write_data, args.num, seed=123)
    if not args.model:
        ap.error("--model FOLDER is required (or --write-data DIR)")
    pipe = Pipeline.from_pretrained(args.model)
    rng = np.random.default_rng(args.seed)

    def encode(scenes: list[Scene]) -> torch.Tensor:
        out = []
        for i in range(0, len(scenes), 32):
            x = np.stack([render(s, 256) for s in scenes[i:i + 32]])
            out.append(pipe.vae.encode(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1))
        return torch.cat(out)                                                 # (n, C, 8, 8)

    def lattice(case: tuple[str, str, str, str]) -> torch.Tensor:
        lo, hi = centre_range(case[2])
        points = np.linspace(lo, hi, args.grid)
        return encode([scene(case, x, y) for x in points for y in points])

    def errors(fn, tests: torch.Tensor) -> list[float]:
        g = torch.Generator().manual_seed(args.seed)
        out = []
        for t in TIMES:
            eps = torch.randn(tests.shape, generator=g)
            x_t = (1 - t) * tests + t * eps
            out.append((fn(x_t, torch.full((len(tests),), t)) - (eps - tests)).square().mean().item())
        return out

    if args.attributes:
        shape, color, size, bg = case = CASES[0]
        tests = encode([scene(case, *rng.uniform(*centre_range(size), 2)) for _ in range(args.scenes)])
        unknown = {"nothing (exact)": [case],
                   "colour": [(shape, c, size, bg) for c in allowed_colors(bg)],
                   "shape": [(s, color, size, bg) for s in shapes.SHAPES],
                   "size": [(shape, color, z, bg) for z in SIZES],
                   "background": [(shape, color, size, b) for b in shapes.BACKGROUNDS if color in allowed_colors(b)]}
        print(f"{args.model}: \"{caption(case)}\", lattice {args.grid}x{args.grid}, {args.scenes} test scenes; "
              f"velocity MSE of the exact denoiser that does not know one attribute\n")
        print("| unknown | " + " | ".join(f"t = {t}" for t in TIMES) + " |")
        print("|---|" + "---:|" * len(TIMES))
        for name, cases in unknown.items():
            row = errors(exact_velocity(torch.cat([lattice(c) for c in cases])), tests)
            print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        return

    losses = {t: [[], []] for t in TIMES}
    passed, rows = [0, 0], []
    for case in CASES:
        shape, color, size, bg = case
        assert color in allowed_colors(bg), (color, bg)
        exact = exact_velocity(lattice(case))
        tests = encode([scene(case, *rng.uniform(*centre_range(size), 2)) for _ in range(args.scenes)])
        n = len(tests)
        text, mask = pipe.text.encode([caption(case)] * max(n, args.samples))
        dit = dit_velocity(pipe.dit, text[:n], mask[:n], True)
        for k, fn in enumerate((exact, dit)):
            for t, err in zip(TIMES, errors(fn, tests)):
                losses[t][k].append(err)
        prompt = EvalPrompt("colors", caption(case), Requirement((Item(shape, color),), exact=True))
        noise = initial_noise(range(args.samples), tuple(tests.shape[1:]))
        dit = dit_velocity(pipe.dit, text[:args.samples], mask[:args.samples], True)
        for k, fn in enumerate((exact, dit)):
            images = to_uint8(pipe.vae.decode(dpm_solver_2m(fn, noise.clone(), flow_times(20, pipe.flow_shift))))
            passed[k] += sum(check(prompt, detect(im)) for im in images)
            rows.append(np.concatenate(list(images), 1))                     # (256, samples * 256, 3)
    print(f"{args.model}: {len(CASES)} one-object captions, lattice {args.grid}x{args.grid}, {args.scenes} test "
          f"scenes each; velocity MSE against noise - z\n")
    print("| t | exact denoiser | DiT | DiT - exact |")
    print("|---|---:|---:|---:|")
    for t in TIMES:
        e, d = (float(np.mean(v)) for v in losses[t])
        print(f"| {t} | {e:.3f} | {d:.3f} | {d - e:.3f} |")
    total = len(CASES) * args.samples
    print(f"\nSampled from the same noise (20 Flow-DPM-Solver steps, no guidance), exactly one object of the caption's "
          f"shape and colour: exact denoiser {passed[0]}/{total}, DiT {passed[1]}/{total}")
    if args.out:
        from PIL import Image
        grid = Image.fromarray(np.concatenate(rows, 0))
        grid.resize((grid.width // 2, grid.height // 2), Image.LANCZOS).save(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
