"""Inference-time noise search: draw N starting noises per image and keep the sample that scores best.

Three scores, all computed by the generating model itself (none looks at the evaluator that judges the result):
- "prompt": how much the prompt helps the model denoise the sample: re-noise it at a few t with a fixed probe noise
  and compare the text and null branches' velocity errors (the diffusion classifier of Li et al., arXiv 2303.16203,
  as a verifier in the sense of Ma et al., arXiv 2501.09732). Higher: the sample is more the prompt's.
- "stability": cos(noise, inversion of the sample) (Qi et al., arXiv 2407.14041, Eq. 4), inverted with a few
  first-order steps of the conditional velocity. An exact inverse of the sampler would give 1 for every seed
  (spec noise-search-and-hires.md A4), so the score measures the path's curvature and how far guidance bent it.
- "curvature": the summed squared change of the velocity between steps of the generation pass; free (spec A4's
  zero-NFE proxy). Higher is kept: on the bundled model, straight paths are the ones that draw too little (the
  sign was measured on held-out prompts and checked on others, docs/noise-search.md).

"stability" is the default: on the bundled model it gained over a random seed on both prompt sets measured, and
never less than "prompt", the independent verifier (docs/noise-search.md; the spec's decision rule, A4).

Costs per candidate, in network calls of one row (a guided step is a 2-row call): generation 2 * steps; "prompt"
adds 2 * len(probe_ts) (8 by default), "stability" adds inversion_steps (5), "curvature" nothing. What each buys on
the bundled model, against best-of-N at equal cost and a random seed: docs/noise-search.md
(benchmarks/noise_search.py).

Candidate k of an image with seed s starts from the noise of seed s * N + k (`candidate_seeds`), so one candidate
(N = 1) is plain generation with seed s.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .pipeline import (
    SAMPLERS,
    GenerateRequest,
    Pipeline,
    classifier_free,
    dit_velocity,
    initial_noise,
    velocity_pair,
)
from .samplers import ModelFn, euler, flow_times

SCORES = ("prompt", "stability", "curvature")
PairFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
PROBE_SEED = 2 ** 31 - 1      # the probe noise of "prompt": one fixed draw, the same for every candidate
PROBE_TS = (0.3, 0.5, 0.7, 0.9)     # where "prompt" re-noises the sample
INVERSION_STEPS = 5                 # Flow-Euler steps of the "stability" inversion


def extra_rows(score: str, probe_ts: Sequence[float] = PROBE_TS, inversion_steps: int = INVERSION_STEPS) -> int:
    """Network rows a score adds to one candidate (a guided generation costs 2 * steps)."""
    return {"prompt": 2 * len(probe_ts), "stability": inversion_steps, "curvature": 0}[score]


def candidate_seeds(seed: int, candidates: int) -> list[int]:
    """The seeds of an image's N candidates: s * N ... s * N + N - 1 (disjoint across images, s itself if N = 1)."""
    return [seed * candidates + k for k in range(candidates)]


def recording(model_fn: ModelFn) -> tuple[ModelFn, list[Tensor]]:
    """model_fn, and a list that collects every velocity it returns (for `curvature`)."""
    seen: list[Tensor] = []

    def fn(x: Tensor, t: Tensor) -> Tensor:
        v = model_fn(x, t)
        seen.append(v)
        return v
    return fn, seen


def curvature(velocities: Sequence[Tensor]) -> Tensor:
    """sum_k mean((v_{k+1} - v_k)^2) per row: 0 for a straight path, higher the more it bends. -> (B,)"""
    if len(velocities) < 2:
        raise ValueError(f"velocities: need at least 2 steps, got {len(velocities)}")
    change = [(b - a).square().flatten(1).mean(1) for a, b in itertools.pairwise(velocities)]
    return torch.stack(change).sum(0)


def stability(model_fn: ModelFn, noise: Tensor, x0: Tensor, ts: Tensor) -> Tensor:
    """cos(noise, x0 inverted by Flow-Euler over the grid ts, given 1 -> 0 and run 0 -> 1) per row. -> (B,)"""
    back = euler(model_fn, x0.float(), ts.flip(0).float())
    return F.cosine_similarity(noise.flatten(1).float(), back.flatten(1), dim=1)


def prompt_gain(pair_fn: PairFn, x0: Tensor, probe: Tensor, ts: Sequence[float]) -> Tensor:
    """Per t in ts: mean((v_null - u)^2) - mean((v_text - u)^2), with x_t = (1 - t) x0 + t probe and u = probe - x0,
    the velocity that would take x_t to x0. Positive where the prompt explains the sample better than no prompt
    does. -> (len(ts), B)"""
    u = probe - x0                                                                  # (B, C, h, w)
    out = []
    for t in ts:
        x_t = (1 - t) * x0 + t * probe
        v_null, v_text = pair_fn(x_t, torch.full((len(x0),), float(t), device=x0.device))
        out.append((v_null - u).square().flatten(1).mean(1) - (v_text - u).square().flatten(1).mean(1))
    return torch.stack(out)


@dataclasses.dataclass(frozen=True)
class Scored:
    noise: Tensor                   # (B, C, h, w) the starting noises
    latents: Tensor                 # (B, C, h, w) their samples
    scores: dict[str, Tensor]       # name -> (B,), higher is better


@torch.no_grad()
def score_samples(pipe: Pipeline, req: GenerateRequest, scores: Sequence[str] = SCORES,
                  probe_ts: Sequence[float] = PROBE_TS, inversion_steps: int = INVERSION_STEPS) -> Scored:
    """Generate the request's images as latents (one per seed, as Pipeline.generate does) and score each."""
    unknown = [s for s in scores if s not in SCORES]
    if unknown:
        raise ValueError(f"scores={list(scores)!r}: unknown {unknown}; each must be one of {SCORES}")
    if not isinstance(inversion_steps, int) or inversion_steps < 1:
        raise ValueError(f"inversion_steps={inversion_steps!r}: must be an integer >= 1")
    sampler, grid, integer_t = SAMPLERS[req.sampler]
    shape = pipe.latent_shape(req)
    device = next(pipe.dit.parameters()).device
    c = pipe.text.encode_for_cfg(list(req.prompts), req.negative_prompt, req.images_per_prompt)
    model_fn, velocities = recording(classifier_free(pipe.dit, c.text, c.text_mask, c.null_text, c.null_mask,
                                                     pipe.guidance_of(req), integer_t))
    noise = initial_noise(req.seeds, shape).to(device)
    x0 = sampler(model_fn, noise, grid(req.steps, pipe.flow_shift).to(device))
    out = {}
    if "curvature" in scores:
        out["curvature"] = curvature(velocities)
    if "stability" in scores:
        # the conditional velocity alone (guidance 1), so that the score also sees how far guidance bent the path
        cond = dit_velocity(pipe.dit, c.text, c.text_mask, integer_t)
        out["stability"] = stability(cond, noise, x0, flow_times(inversion_steps, pipe.flow_shift).to(device))
    if "prompt" in scores:
        probe = initial_noise([PROBE_SEED] * len(x0), shape).to(device)
        pair = velocity_pair(pipe.dit, c.text, c.text_mask, c.null_text, c.null_mask, integer_t)
        out["prompt"] = prompt_gain(pair, x0, probe, probe_ts).mean(0)
    return Scored(noise, x0, out)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    latents: Tensor                 # (B, C, h, w) the chosen samples, one per seed of the request
    seeds: tuple[int, ...]          # the chosen candidates' seeds
    scores: Tensor                  # (B, N) every candidate's score


@torch.no_grad()
def search(pipe: Pipeline, req: GenerateRequest, candidates: int, score: str = "stability",
           batch_size: int | None = None) -> SearchResult:
    """For each image of `req`, generate `candidates` samples and keep the best by `score` (one of SCORES).
    batch_size: candidate rows generated per call, rounded up to whole prompts (None: all at once); each prompt is
    encoded once per call, not once per candidate."""
    if not isinstance(candidates, int) or isinstance(candidates, bool) or candidates < 1:
        raise ValueError(f"candidates={candidates!r}: must be an integer >= 1")
    if score not in SCORES:
        raise ValueError(f"score={score!r}: must be one of {SCORES}")
    n, per = candidates, req.images_per_prompt * candidates         # per: rows of one prompt
    # rows: image-major, the candidates of one image together, as encode_for_cfg repeats each prompt `per` times
    seeds = [s for seed in req.seeds for s in candidate_seeds(seed, n)]
    step = max(1, (batch_size or len(seeds)) // per)                # prompts per call
    latents, values = [], []
    for a in range(0, len(req.prompts), step):
        sub = dataclasses.replace(req, prompts=req.prompts[a:a + step], seeds=tuple(seeds[a * per:(a + step) * per]),
                                  images_per_prompt=per)
        scored = score_samples(pipe, sub, (score,))
        latents.append(scored.latents)
        values.append(scored.scores[score])
    z = torch.cat(latents).unflatten(0, (len(req.seeds), n))                        # (B, N, C, h, w)
    v = torch.cat(values).view(len(req.seeds), n)                                  # (B, N)
    best = v.argmax(1)                                                              # (B,)
    return SearchResult(z[torch.arange(len(z)), best], tuple(seeds[i * n + int(k)] for i, k in enumerate(best)), v)
