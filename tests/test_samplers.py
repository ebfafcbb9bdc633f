"""Samplers against diffusers' schedulers (same velocity, same grid) and against an exact flow (closed-form velocity)."""
import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from sanaflow.flow import gaussian_mixture_velocity, shift_time
from sanaflow.samplers import dpm_solver_2m, euler, flow_times, flow_times_euler, invert, rk4

W = torch.randn(6, 6, generator=torch.Generator().manual_seed(3)) * 0.5


def toy_velocity(x, t):          # any smooth field that depends on x and t
    return torch.tanh(x @ W) * (1 + t.view(-1, 1))


@pytest.mark.parametrize("steps", [1, 2, 5, 20, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_dpm_solver_matches_diffusers_step_by_step(steps, shift):
    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
    sched.set_timesteps(steps)
    ts = flow_times(steps, shift)
    assert torch.equal(ts, sched.sigmas.float())                      # the same grid, bit for bit
    x0 = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    expected, x = [], x0.clone()
    for i, t in enumerate(sched.timesteps):
        x = sched.step(toy_velocity(x, sched.sigmas[i].expand(4)), t, x).prev_sample
        expected.append(x)
    got = []
    dpm_solver_2m(toy_velocity, x0.clone(), ts, callback=lambda i, n, x: got.append(x))
    assert len(got) == steps
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 5, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_matches_diffusers_flow_match_euler(steps, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    ts = flow_times_euler(steps, shift)
    assert torch.equal(ts, sched.sigmas)          # incl. diffusers' doubly shifted last point (interop §3.3)
    x0 = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    x = x0.clone()
    for i, t in enumerate(sched.timesteps):
        x = sched.step(toy_velocity(x, sched.sigmas[i].expand(4)), t, x).prev_sample
    torch.testing.assert_close(euler(toy_velocity, x0.clone(), ts), x, atol=1e-6, rtol=0)


def test_grids_run_from_noise_to_data():
    for ts in (flow_times(20, 3.0), flow_times_euler(20, 3.0)):
        assert ts[-1] == 0 and ts[0] > 0.99 and torch.all(ts[1:] < ts[:-1])
    torch.testing.assert_close(flow_times(4, 1.0), torch.tensor([0.999, 0.74925, 0.4995, 0.24975, 0.0]))
    torch.testing.assert_close(shift_time(torch.tensor(0.5), 3.0), torch.tensor(0.75))


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_step_counts_name_the_parameter(bad):
    for grid in (flow_times, flow_times_euler):
        with pytest.raises(ValueError, match="steps"):
            grid(bad, 3.0)


# ---- an exact flow: data from a Gaussian mixture, velocity in closed form (sanaflow.flow) --------------------------


def mixture():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 8, generator=g, dtype=torch.float64) * 0.8
    v = gaussian_mixture_velocity(means, torch.tensor([0.5, 0.6, 0.8]), torch.tensor([0.5, 0.3, 0.2]))
    return v, torch.randn(64, 8, generator=g, dtype=torch.float64)


def test_the_mixture_velocity_is_the_conditional_expectation():
    # Monte Carlo check of v(x, t) = E[noise - x0 | x_t = x] for a single Gaussian (closed form: linear in x).
    mu, s, t = torch.tensor([[1.0, -2.0]]), 0.7, 0.4
    v = gaussian_mixture_velocity(mu, torch.tensor([s]), torch.tensor([1.0]))
    g = torch.Generator().manual_seed(0)
    x0 = mu + s * torch.randn(400_000, 2, generator=g)
    noise = torch.randn(400_000, 2, generator=g)
    xt = (1 - t) * x0 + t * noise
    # Regress (noise - x0) on x_t per dimension; for jointly Gaussian variables the regression is the expectation.
    target = noise - x0
    slope = ((xt - xt.mean(0)) * (target - target.mean(0))).mean(0) / xt.var(0)
    probe = torch.tensor([[0.3, 0.1]])
    expected = target.mean(0) + slope * (probe - xt.mean(0))
    torch.testing.assert_close(v(probe, torch.tensor([t])), expected, atol=0.01, rtol=0)


def test_samplers_converge_to_the_exact_solution_with_their_orders():
    v, z = mixture()
    ref = rk4(v, z.clone(), flow_times(4000, 3.0).double())      # converged: changes < 1e-9 from 2000 steps
    err = {name: {} for name in ("euler", "dpm")}
    for n in (10, 14, 20, 50, 100, 200, 400):
        ts = flow_times(n, 3.0).double()
        err["euler"][n] = (euler(v, z.clone(), ts) - ref).pow(2).mean().sqrt().item()
        err["dpm"][n] = (dpm_solver_2m(v, z.clone(), ts) - ref).pow(2).mean().sqrt().item()
    order = lambda e, a, b: math.log(e[a] / e[b]) / math.log(b / a)  # noqa: E731
    assert 0.9 < order(err["euler"], 100, 400) < 1.1               # first order
    # Second order, reached only asymptotically on SANA's grid: its last steps near t = 0 stay O(1) long in
    # lambda = log((1 - t) / t) whatever N is. Measured: 1.50 (100 -> 200), 1.66 (200 -> 400).
    assert order(err["dpm"], 200, 400) > 1.5
    assert all(err["dpm"][n] < err["euler"][n] for n in err["dpm"])
    assert all(err["dpm"][n] < err["euler"][n] / 3 for n in (50, 100, 200, 400))
    assert err["dpm"][400] < 1e-3


@pytest.mark.parametrize("sampler", [euler, dpm_solver_2m])
def test_inversion_recovers_the_noise_of_a_50_step_sample(sampler):
    v, z = mixture()
    ts = flow_times(50, 3.0)
    sample = sampler(v, z.float(), ts)
    recovered = invert(sampler, v, sample, ts)
    assert recovered.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(recovered.double(), z, dim=1)
    assert cos.min() >= 0.99                       # per sample (issue 4's bar); measured >= 0.9994
    # and it is the solver, not luck: a 5-step inversion is measurably worse
    coarse = invert(sampler, v, sample, flow_times(5, 3.0))
    assert (coarse.double() - z).norm() > 2 * (recovered.double() - z).norm()


def test_single_gaussian_has_a_closed_form_solution_that_every_solver_reaches():
    # Data N(mu, s^2 I): x_t = (1 - t) mu + sqrt((1 - t)^2 s^2 + t^2) z solves the ODE, so noise z at t = 1 maps to
    # mu + s z. This checks rk4 (the reference of the mixture tests) against an answer that is not a solver's.
    mu, s = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64), 0.6
    v = gaussian_mixture_velocity(mu, torch.tensor([s]), torch.tensor([1.0]))
    z = torch.randn(32, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = mu + s * z
    ts = shift_time(torch.linspace(1, 0, 101, dtype=torch.float64), 3.0)
    assert (rk4(v, z.clone(), ts) - exact).abs().max() < 1e-6                    # measured 1.2e-7
    assert (rk4(v, z.clone(), ts[::2].contiguous()) - exact).abs().max() > 4 * (rk4(v, z.clone(), ts) - exact).abs().max()
    for sampler, tol in ((euler, 0.06), (dpm_solver_2m, 0.01)):                 # measured 0.047, 0.0077
        assert (sampler(v, z.clone(), ts) - exact).abs().max() < tol
