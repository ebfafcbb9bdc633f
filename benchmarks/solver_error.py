"""Final-sample error against the exact ODE solution versus NFE, Flow-Euler and Flow-DPM-Solver, on an exact flow.

Data is a Gaussian mixture, so the velocity is known in closed form (`sanaflow.flow.gaussian_mixture_velocity`);
the exact solution is classical RK4 on 4000 shifted steps from t = 1 (its change from 2000 steps is printed; on a
single Gaussian, where the answer is closed-form, this RK4 is within 1.2e-7 at 100 steps: tests/test_samplers.py).
Both samplers start from the same noise at t = 1 with SANA's flow shift 3 and run as SANA runs them: Flow-Euler on
the FlowMatchEuler grid (from t = 1), Flow-DPM-Solver on the DPM grid (from t = 0.999, taking the noise as x there).
A third column runs Euler on the DPM grid, to separate the solver from the grid. Error: RMS over samples and dims.

    python benchmarks/solver_error.py                    # table to stdout, plot to docs/solver_error.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sanaflow.flow import gaussian_mixture_velocity, shift_time
from sanaflow.samplers import dpm_solver_2m, euler, flow_times, flow_times_euler, rk4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 8, 10, 14, 20, 28, 50])
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--plot", type=Path, default=Path(__file__).parent.parent / "docs" / "solver_error.png")
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)   # the mixture of tests/test_samplers.py: 3 components in 8 dims
    means = torch.randn(3, 8, generator=g, dtype=torch.float64) * 0.8
    v = gaussian_mixture_velocity(means, torch.tensor([0.5, 0.6, 0.8]), torch.tensor([0.5, 0.3, 0.2]))
    z = torch.randn(args.samples, 8, generator=g, dtype=torch.float64)
    fine = lambda n: shift_time(torch.linspace(1, 0, n + 1, dtype=torch.float64), args.shift)  # noqa: E731
    exact = rk4(v, z.clone(), fine(4000))
    rms = lambda x: (x.double() - exact).pow(2).mean().sqrt().item()  # noqa: E731
    print(f"Gaussian mixture (3 components, 8 dims), {args.samples} samples, shift {args.shift}; reference RK4 "
          f"4000 steps (RMS change from 2000 steps: {rms(rk4(v, z.clone(), fine(2000))):.1e})\n")
    print("| NFE | Flow-Euler (Euler grid) | Flow-Euler (DPM grid) | Flow-DPM-Solver (2M) |")
    print("|---:|---:|---:|---:|")
    rows = []
    for n in args.nfe:
        ts_dpm = flow_times(n, args.shift).double()
        row = (n, rms(euler(v, z.clone(), flow_times_euler(n, args.shift).double())), rms(euler(v, z.clone(), ts_dpm)),
               rms(dpm_solver_2m(v, z.clone(), ts_dpm)))
        rows.append(row)
        print(f"| {n} | {row[1]:.2e} | {row[2]:.2e} | {row[3]:.2e} |")
    err = {r[0]: r for r in rows}
    if 14 in err and 50 in err:
        ok = err[14][3] <= err[50][1]
        print(f"\nDPM-Solver at 14 NFE {err[14][3]:.2e} vs Euler at 50 NFE {err[50][1]:.2e}: "
              f"{'at least as accurate' if ok else 'LESS accurate'}")
        crossing = next((r[0] for r in rows if r[3] <= err[50][1]), None)
        print(f"smallest NFE in the table at which DPM-Solver is as accurate as Euler at 50: {crossing}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    nfe = [r[0] for r in rows]
    for i, (label, style) in enumerate([("Flow-Euler (Euler grid)", "o-"), ("Flow-Euler (DPM grid)", "s--"),
                                        ("Flow-DPM-Solver 2M", "^-")], start=1):
        ax.loglog(nfe, [r[i] for r in rows], style, label=label)
    ax.set(xlabel="NFE (model evaluations)", ylabel="RMS error vs exact ODE solution",
           title=f"Exact flow of a Gaussian mixture, shift {args.shift:g}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
