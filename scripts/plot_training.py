"""Loss against step for training runs, from their log.jsonl files, as one PNG (needs matplotlib: the dev extra).

    python scripts/plot_training.py runs/shapes-dcae runs/shapes-text runs/shapes-dit --out docs/training_curves.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sanaflow.files import atomic_write  # noqa: E402


def read_log(run: Path) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    for line in (run / "log.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if "loss" in entry:
            steps.append(entry["step"])
            losses.append(entry["loss"])
    return steps, losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/training_curves.png"))
    ap.add_argument("--smooth", type=int, default=10, help="moving-average window, in logged points")
    args = ap.parse_args()

    fig, axes = plt.subplots(1, len(args.runs), figsize=(4.5 * len(args.runs), 3.4), squeeze=False)
    for ax, run in zip(axes[0], args.runs):
        if not (run / "log.jsonl").is_file():
            raise SystemExit(f"{run / 'log.jsonl'}: not found (is {run} a training run folder?)")
        steps, losses = read_log(run)
        task = json.loads((run / "config.json").read_text())["task"]
        ax.plot(steps, losses, lw=0.5, alpha=0.35, color="C0")
        k = max(1, min(args.smooth, len(losses)))
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.5, color="C0")
        ax.set_yscale("log")
        ax.set_title(f"{run.name} ({task})")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(args.out, lambda p: fig.savefig(p, dpi=110, format="png"))   # a reader never sees half a PNG
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
