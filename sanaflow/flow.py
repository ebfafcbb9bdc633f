"""The one flow-matching convention of sanaflow (sana-spec §4.1), written once and imported everywhere.

    x_t = (1 - t) * x0 + t * noise,   t = 1 is pure noise,   v = dx_t/dt = noise - x0,   sampling runs t: 1 -> 0.

SANA's networks see the timestep in units of 1000 * t (sana-spec §1.11); `network_time` is the only place that
conversion happens.
"""
from __future__ import annotations

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
