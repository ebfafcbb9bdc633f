"""The one flow-matching convention of sanaflow (sana-spec §4.1), written once and imported everywhere.

    x_t = (1 - t) * x0 + t * noise,   t = 1 is pure noise,   v = dx_t/dt = noise - x0,   sampling runs t: 1 -> 0.

SANA's networks see the timestep in units of 1000 * t (sana-spec §1.11); `network_time` is the only place that
conversion happens.
"""
from __future__ import annotations

import torch
from torch import Tensor


def flow_path(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    t = t.view(-1, *[1] * (x0.ndim - 1))        # (B, 1, 1, 1)
    return (1 - t) * x0 + t * noise              # t = 0 data, t = 1 noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    return noise - x0                            # dx_t/dt along the straight path


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SANA's flow shift (arXiv 2410.10629 §2.4; SD3 Eq. 23): shift > 1 spends more of the schedule near t = 1,
    which high resolutions need because more pixels keep more signal at the same noise level."""
    return shift * t / (1 + (shift - 1) * t)


def network_time(t: Tensor, integer: bool = False) -> Tensor:
    """Flow time t in [0, 1] -> the timestep SANA's DiT was trained on: 1000 * t, truncated to an integer when
    `integer` (training and diffusers' DPM-Solver use int(1000 * sigma); diffusers' Euler passes the float)."""
    t = t.float() * 1000
    return t.trunc() if integer else t


def gaussian_mixture_velocity(means: Tensor, stds: Tensor, weights: Tensor):
    """The exact velocity field of the flow above when x0 ~ sum_k w_k N(means[k], stds[k]^2 I) (per dimension).

    Under component k, (x0, noise, x_t) are jointly Gaussian; with a = 1 - t, b = t:
        v_k(x) = E[noise - x0 | x_t = x, k] = (b - a s_k^2) / (a^2 s_k^2 + b^2) * (x - a mu_k) - mu_k,
    and v = sum_k p(k | x_t = x) v_k with p(k | x) from N(x; a mu_k, (a^2 s_k^2 + b^2) I). A closed-form model_fn
    for measuring samplers against the true ODE (tests, benchmarks/solver_error.py). means: (K, D); stds,
    weights: (K,). Returns model_fn(x (B, D), t (B,)) -> (B, D), computed in x's dtype.
    """
    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        mu, s, w = means.to(x), stds.to(x), weights.to(x)
        a, b = (1 - t.to(x))[:, None, None], t.to(x)[:, None, None]          # (B, 1, 1)
        var = a**2 * s[None, :, None] ** 2 + b**2                            # (B, K, 1)
        diff = x[:, None, :] - a * mu[None]                                  # (B, K, D)
        logp = torch.log(w)[None] - 0.5 * (diff**2 / var).sum(-1) - 0.5 * x.shape[-1] * torch.log(var[..., 0])
        post = torch.softmax(logp, dim=1)[..., None]                         # (B, K, 1)
        v_k = (b - a * s[None, :, None] ** 2) / var * diff - mu[None]        # (B, K, D)
        return (post * v_k).sum(1)                                           # (B, D)
    return model_fn
