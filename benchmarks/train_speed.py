"""Training throughput and model-FLOPs utilisation (MFU) of the DiT, against this machine's measured matmul peak.

In one process, alternating within each round (this VM drifts 10-20 % over seconds):
  - peak: fp32 square matmuls (torch.mm, n = 2048), the best FLOP/s any dense kernel reaches here;
  - step: one training step of the loop's DiT task (forward, MSE, backward, clip, AdamW) on a batch of cached
    latents and caption embeddings shaped like the bundled model's data (8x8 latents of 32 channels, 48 text
    tokens of 256 features, 256 px images).
Model FLOPs of a step = 3 x the forward FLOPs counted by torch.utils.flop_counter (matmuls and convolutions; backward
costs twice the forward, the usual MFU convention; the optimizer and elementwise ops are not counted). The counter's
own backward count is not used: torch 2.13 counts the depthwise conv's backward as a dense conv (~20x too high).
MFU = model FLOPs per second / peak FLOP/s, per round; the table gives medians.

    python benchmarks/train_speed.py                       # the bundled model's preset ("small"), batch 64
    python benchmarks/train_speed.py --model tiny --batch 16 --rounds 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sanaflow.dit import DIT_PRESETS, DiT
from sanaflow.flow import flow_path, network_time, velocity_target


def matmul_peak(n: int = 2048, reps: int = 4) -> tuple[float, float]:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)                                          # warm-up
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    seconds = time.perf_counter() - start
    return 2 * n ** 3 * reps / seconds, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", choices=sorted(k for k in DIT_PRESETS if not k.startswith("sana")))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--latent", type=int, default=8, help="latent side (image side / 32)")
    ap.add_argument("--text-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = DIT_PRESETS[args.model]
    torch.manual_seed(0)
    model = DiT(cfg)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, c, s = args.batch, cfg.in_channels, args.latent
    x0, noise = torch.randn(b, c, s, s), torch.randn(b, c, s, s)
    text = torch.randn(b, args.text_tokens, cfg.caption_channels)
    mask = torch.ones(b, args.text_tokens, dtype=torch.long)
    t = torch.rand(b)

    def step() -> None:
        v = model(flow_path(x0, noise, t), network_time(t, True), text, mask)
        F.mse_loss(v, velocity_target(x0, noise)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(flow_path(x0, noise, t), network_time(t, True), text, mask)
    flops = 3 * counter.get_total_flops()
    step()                                                  # warm-up
    peaks, steps = [], []
    for r in range(args.rounds):
        order = ("peak", "step") if r % 2 == 0 else ("step", "peak")
        for what in order:
            if what == "peak":
                peaks.append(matmul_peak()[0])
            else:
                start = time.perf_counter()
                step()
                steps.append(time.perf_counter() - start)
    mfu = [flops / st / pk for st, pk in zip(steps, peaks)]
    params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {args.threads} threads, fp32; DiT '{args.model}' ({params / 1e6:.1f}M params, "
          f"depth {cfg.depth}, width {cfg.width}); batch {b}, {s}x{s} latents, {args.text_tokens} text tokens; "
          f"{args.rounds} rounds\n")
    print("| quantity | median | min | max |")
    print("|---|---:|---:|---:|")
    rows = {
        "matmul peak (GFLOP/s, fp32 mm 2048^2)": [p / 1e9 for p in peaks],
        "train step (ms)": [1e3 * x for x in steps],
        "throughput (images/s)": [b / x for x in steps],
        "model GFLOP per step (3 x counted forward)": [flops / 1e9],
        "achieved GFLOP/s": [flops / x / 1e9 for x in steps],
        "MFU (achieved / peak)": mfu,
    }
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.3g} | {min(values):.3g} | {max(values):.3g} |")


if __name__ == "__main__":
    main()
