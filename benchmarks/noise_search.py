"""Does noise search pay on a trained model? Each score of sanaflow.noise_search against a random seed, against
best-of-N with an independent verifier at equal cost, and against the evaluator's own best of N (a ceiling).

Protocol (spec noise-search-and-hires.md A2/A4): for every GenEval-style prompt, a pool of M seeds is generated
once and every score is computed for every sample; the shapes evaluator judges each sample (pass, and item recall:
the share of named objects found). Selection is then evaluated exactly, without resampling: choosing the best of N
candidates drawn at random from the pool without replacement, the sample ranked r-th by the score (r = 0 best) is
the one kept with probability C(M - 1 - r, N - 1) / C(M, N). Budgets are in generations: a score that costs
a fraction c of a generation more per candidate gets N = floor(B / (1 + c)) candidates at budget B. The scores
never see the evaluator; "evaluator" rows select by the metric itself, the most any selection could reach.

Figures: overall = mean over categories of the per-prompt pass rate (GenEval's weighting); gain = selected - random
seed, with a 95 % interval from a bootstrap over prompts (stratified by category); rho = Spearman correlation of
the score with item recall within a prompt, averaged over prompts whose samples differ.

    python benchmarks/noise_search.py                             # the bundled model, held-out prompts
    python benchmarks/noise_search.py --split train --per-category 10 --pool 8
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from sanaflow.geneval import check, detect, items_found, prompt_set
from sanaflow.noise_search import SCORES, extra_rows, score_samples
from sanaflow.pipeline import GenerateRequest, Pipeline, load_default


def keep_weights(m: int, n: int) -> np.ndarray:
    """P(the r-th best of m is the best of n drawn without replacement), r = 0 ... m - 1."""
    return np.array([math.comb(m - 1 - r, n - 1) for r in range(m)], dtype=np.float64) / math.comb(m, n)


def selected(metric: np.ndarray, score: np.ndarray, n: int) -> np.ndarray:
    """Expected metric per prompt when the best of n random pool members by `score` is kept. (P, M) -> (P,)"""
    order = np.argsort(-score, axis=1, kind="stable")
    return (np.take_along_axis(metric, order, axis=1) * keep_weights(metric.shape[1], n)).sum(1)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = (np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(float) for v in (a, b))
    # average ranks for ties (item recall and pass take few values)
    for r, v in ((ra, a), (rb, b)):
        for value in np.unique(v):
            r[v == value] = r[v == value].mean()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a pipeline folder (default: the bundled model)")
    ap.add_argument("--split", choices=["held-out", "train"], default="held-out")
    ap.add_argument("--per-category", type=int, default=8)
    ap.add_argument("--pool", type=int, default=16, help="seeds generated per prompt (M)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--save", default=None, help="write the per-sample scores and verdicts to this .npz")
    args = ap.parse_args()
    if max(args.budgets) > args.pool:
        ap.error(f"--budgets: the largest ({max(args.budgets)}) exceeds --pool {args.pool}")

    torch.set_grad_enabled(False)
    pipe = Pipeline.from_pretrained(args.model) if args.model else load_default()
    size = pipe.native_size
    prompts = prompt_set(held_out=args.split == "held-out", seed=args.seed, per_category=args.per_category)
    m = args.pool
    jobs = [(i, args.seed + i * m + k) for i in range(len(prompts)) for k in range(m)]
    scores = {s: np.zeros((len(prompts), m)) for s in SCORES}
    passed, recall = np.zeros((len(prompts), m)), np.zeros((len(prompts), m))

    def request(chunk):
        return GenerateRequest(prompts=tuple(prompts[i].text for i, _ in chunk), height=size, width=size,
                               steps=args.steps, guidance=args.guidance, seeds=tuple(s for _, s in chunk))

    # cost of each score per candidate in network rows (a guided step is 2), as a fraction of a generation's; the
    # budgets use these counts (wall-clock on a busy machine is too noisy to set them). Wall-clock: below.
    extra = {s: extra_rows(s) / (2 * args.steps) for s in SCORES}
    probe = request(jobs[:8])
    wall = {name: [] for name in ("generate", *SCORES)}
    for _ in range(3):                                              # interleaved repeats; the median is reported
        for name in wall:
            t0 = time.perf_counter()
            score_samples(pipe, probe, () if name == "generate" else (name,))
            wall[name].append(time.perf_counter() - t0)
    wall = {name: float(np.median(v)) for name, v in wall.items()}

    start = time.perf_counter()
    for b in range(0, len(jobs), args.batch):
        chunk = jobs[b:b + args.batch]
        out = score_samples(pipe, request(chunk))
        images = (pipe.decode(out.latents, size, size).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        for row, ((i, _), im) in enumerate(zip(chunk, images)):
            k = (b + row) % m
            dets = detect(im)
            _, both = items_found(prompts[i], dets)                  # items found by shape and colour
            passed[i, k], recall[i, k] = check(prompts[i], dets), both / len(prompts[i].requirement.items)
            for s in SCORES:
                scores[s][i, k] = float(out.scores[s][row])
    elapsed = time.perf_counter() - start

    if args.save:
        np.savez(args.save, passed=passed, recall=recall, categories=[p.category for p in prompts],
                 **{f"score_{k}": v for k, v in scores.items()})
    # all three scores at once: the mean of their within-prompt ranks (the ensemble of Ma et al. arXiv 2501.09732)
    ranks = [np.argsort(np.argsort(scores[s], axis=1), axis=1) for s in SCORES]
    scores["all three (rank mean)"] = np.mean(ranks, axis=0)
    extra["all three (rank mean)"] = sum(extra[s] for s in SCORES)

    cats = sorted({p.category for p in prompts})
    by_cat = [np.array([j for j, p in enumerate(prompts) if p.category == c]) for c in cats]
    rng = np.random.default_rng(0)
    boot = [[rng.choice(idx, len(idx)) for idx in by_cat] for _ in range(args.bootstrap)]

    def overall(per_prompt: np.ndarray, groups=None) -> float:
        return float(np.mean([per_prompt[idx].mean() for idx in (groups or by_cat)]))

    def interval(diff: np.ndarray) -> str:
        b = np.array([overall(diff, g) for g in boot])
        return f"{overall(diff):+.3f} [{np.percentile(b, 2.5):+.3f}, {np.percentile(b, 97.5):+.3f}]"

    guidance = pipe.guidance if args.guidance is None else args.guidance
    print(f"model {pipe.name}; {args.split} prompts: {len(prompts)} ({', '.join(f'{c} {len(i)}' for c, i in zip(cats, by_cat))}); "
          f"pool {m} seeds each ({len(jobs)} samples, {elapsed:.0f} s), {args.steps} Flow-DPM-Solver steps, "
          f"guidance {guidance:g}")
    print("cost per candidate, in network rows: " + ", ".join(f"{s} +{extra[s]:.3f}" for s in SCORES)
          + " of a generation; wall-clock for a batch of {n} (median of 3): generation {g:.2f} s, ".format(
              n=len(probe.seeds), g=wall["generate"])
          + ", ".join(f"{s} +{wall[s] / wall['generate'] - 1:.2f}" for s in SCORES) + "\n")

    rand_pass, rand_recall = passed.mean(1), recall.mean(1)
    print(f"random seed: pass {overall(rand_pass):.3f}, item recall {overall(rand_recall):.3f}\n")
    print("| score | rho (recall) | rho (pass) |")
    print("|---|---:|---:|")
    for s in scores:
        rho_r = [spearman(scores[s][i], recall[i]) for i in range(len(prompts))]
        rho_p = [spearman(scores[s][i], passed[i]) for i in range(len(prompts))]
        print(f"| {s} | {np.nanmean(rho_r):+.3f} (n={np.isfinite(rho_r).sum()}) | "
              f"{np.nanmean(rho_p):+.3f} (n={np.isfinite(rho_p).sum()}) |")
    print("\n| budget (generations) | selection | N | pass | gain over a random seed | item recall | gain |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for budget in args.budgets:
        rows = [("evaluator (ceiling)", passed + 1e-3 * recall, budget)]
        rows += [(s, scores[s], int(budget // (1 + extra[s]))) for s in scores]
        for name, score, n in rows:
            if n < 1:
                print(f"| {budget} | {name} | 0 | - | - | - | - |")
                continue
            p, r = selected(passed, score, n), selected(recall, score, n)
            print(f"| {budget} | {name} | {n} | {overall(p):.3f} | {interval(p - rand_pass)} | {overall(r):.3f} | "
                  f"{interval(r - rand_recall)} |")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
