"""Samplers: pure functions of (model_fn, x, ts), ts running from noise (t near 1) to data (t = 0).

`model_fn(x (B, C, H, W), t (B,)) -> v` is any velocity function; guidance is a wrapper that builds one.
Nothing here reads a config, keeps state or draws random numbers. Time grids come from their own functions.
Spec: sana-spec §5, diffusers-interop §3 (the arithmetic follows diffusers' schedulers for parity).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .flow import shift_time

ModelFn = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, int, Tensor], None]      # (step index, number of steps, x after the step)


def flow_times(steps: int, shift: float = 3.0, t_max: float = 0.999) -> Tensor:
    """SANA's Flow-DPM-Solver grid: `steps` uniform points from t_max down to t_max/steps, shifted, then 0.

    Identical (in float32) to diffusers' DPMSolverMultistepScheduler(use_flow_sigmas=True) and NVlabs'
    flow DPM-Solver (interop §3.1); the grid starts just below 1 because the flow's lambda = log((1-t)/t) is
    infinite at t = 1. Computed in float64 and rounded once, as they do. -> (steps + 1,) float32."""
    _check_steps(steps)
    u = t_max * (1 - np.arange(steps, dtype=np.float64) / steps)               # (steps,)  t_max ... t_max/steps
    t = shift * u / (1 + (shift - 1) * u)
    return torch.from_numpy(np.append(t, 0.0)).float()                          # (steps + 1,)


def flow_times_euler(steps: int, shift: float = 3.0) -> Tensor:
    """The grid of diffusers' FlowMatchEulerDiscreteScheduler(shift): from t = 1 to a small t, then 0.

    It shifts its last point twice (interop §3.3, §8.10); reproduced for parity with diffusers' pipelines."""
    _check_steps(steps)
    t_min = float(shift_time(torch.tensor(0.001), shift))                      # float32 value, as diffusers
    u = np.linspace(1000.0, 1000.0 * t_min, steps) / 1000                      # (steps,) float64
    t = shift * u / (1 + (shift - 1) * u)
    return torch.cat([torch.from_numpy(t).float(), torch.zeros(1)])             # (steps + 1,)


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: must be an integer >= 1")


@torch.no_grad()
def euler(model_fn: ModelFn, x: Tensor, ts: Tensor, callback: Callback | None = None) -> Tensor:
    """Flow-Euler: x <- x + (t_next - t) * v(x, t). First order; SANA's baseline (paper §2.4)."""
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        x = (x.float() + (t_next - t) * model_fn(x, t.expand(len(x))).float()).to(x.dtype)
        if callback is not None:
            callback(i, len(ts) - 1, x)
    return x


@torch.no_grad()
def dpm_solver_2m(model_fn: ModelFn, x: Tensor, ts: Tensor, callback: Callback | None = None) -> Tensor:
    """Flow-DPM-Solver: DPM-Solver++(2M) (Lu et al., arXiv 2211.01095, Alg. 2) on the flow's data prediction.

    With alpha_t = 1 - t, sigma_t = t, lambda = log(alpha/sigma) and x0 = x - t * v, each step is exact for the
    linear part of the ODE and uses the last two x0 predictions (midpoint rule) for the rest. The first and the
    last step are first order, as in diffusers (final_sigmas_type="zero"); one model call per step.
    Runs in either direction: with increasing ts it is the inversion (data -> noise). A step that starts at t = 0
    (lambda = inf) is the first-order step's limit there, an Euler step.
    """
    lam = lambda s: torch.log(1 - s) - torch.log(s)  # noqa: E731  log-SNR; +inf at s = 0
    x0_prev, lam_prev = None, None
    n = len(ts) - 1
    for i in range(n):
        s, t = ts[i], ts[i + 1]
        v = model_fn(x, s.expand(len(x))).float()
        x0 = x.float() - s * v                                                  # data prediction
        if s == 0:
            x = (x.float() + t * v).to(x.dtype)
        else:
            h = lam(t) - lam(s)
            phi = torch.exp(-h) - 1                                             # -1 on the last step (h = inf)
            d = x0 if x0_prev is None or i == n - 1 else x0 + 0.5 * (x0 - x0_prev) * h / (lam(s) - lam_prev)
            x = ((t / s) * x.float() - (1 - t) * phi * d).to(x.dtype)
        x0_prev, lam_prev = x0, lam(s)
        if callback is not None:
            callback(i, n, x)
    return x


@torch.no_grad()
def rk4(model_fn: ModelFn, x: Tensor, ts: Tensor, callback: Callback | None = None) -> Tensor:
    """Classical 4th-order Runge-Kutta, four model calls per step: a reference solution, not a fast sampler."""
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        h, at = t_next - t, lambda s: s.expand(len(x))  # noqa: E731
        k1 = model_fn(x, at(t))
        k2 = model_fn(x + h / 2 * k1, at(t + h / 2))
        k3 = model_fn(x + h / 2 * k2, at(t + h / 2))
        k4 = model_fn(x + h * k3, at(t_next))
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if callback is not None:
            callback(i, len(ts) - 1, x)
    return x


def invert(sampler, model_fn: ModelFn, x0: Tensor, ts: Tensor, callback: Callback | None = None) -> Tensor:
    """Run `sampler` backwards, data -> noise, over the reversed grid `ts` (given as for sampling, 1 -> 0), in fp32.

    Each step evaluates the model at the point it starts from, so inversion is approximate: it recovers the noise
    of a sample to the accuracy of the solver (tests/test_samplers.py measures it)."""
    return sampler(model_fn, x0.float(), ts.flip(0).float(), callback)
