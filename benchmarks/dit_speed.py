"""Forward latency of our linear DiT against diffusers' SanaTransformer2DModel on identical weights and inputs.

Both models run in this process, one after the other within every round (alternating which goes first), after a
warm-up. This VM's speed drifts by 10-20 % over seconds, so the ratio is the median of the per-round ratios
diffusers / ours (> 1: ours is faster), which cancels drift common to a round; the times are medians. The last
column is the max abs difference of the two outputs.

    python benchmarks/dit_speed.py                      # small and 0.6B-shaped configs, 256 .. 16384 tokens
    python benchmarks/dit_speed.py --layers 28 --tokens 1024 --configs sana-600m
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from diffusers import SanaTransformer2DModel

from sanaflow.dit import DIT_PRESETS, DiT
from sanaflow.keymaps import dit_config_to_diffusers, dit_from_diffusers

CONFIGS = {"small": DIT_PRESETS["small"], "sana-600m": DIT_PRESETS["sana-600m-1024"]}


def paired_times(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Run every candidate once per round, alternating which goes first; per-round times, after a warm-up."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()                                                   # warm-up (allocator, oneDNN kernels)
    items = list(fns.items())
    for r in range(rounds):
        for name, fn in items if r % 2 == 0 else items[::-1]:  # same round, same machine state
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--layers", type=int, default=2, help="blocks per model (latency is linear in depth)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {args.threads} threads, fp32, batch {args.batch}, {args.layers} layers, "
          f"300 text tokens, {args.rounds} rounds\n")
    print("| config | tokens | diffusers ms | sanaflow ms | ratio (median of rounds) | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.configs:
        cfg = dataclasses.replace(CONFIGS[name], depth=args.layers)
        torch.manual_seed(0)
        ref = SanaTransformer2DModel(**dit_config_to_diffusers(cfg)).eval()
        ours = DiT(cfg).eval()
        ours.load_state_dict(dit_from_diffusers(ref.state_dict(), cfg))
        for n in args.tokens:
            side = int(n ** 0.5)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(args.batch, cfg.in_channels, side, n // side, generator=g)
            text = torch.randn(args.batch, 300, cfg.caption_channels, generator=g)
            mask = torch.zeros(args.batch, 300, dtype=torch.long)
            mask[:, :40] = 1                                   # a 40-token prompt, padded to 300
            t = torch.full((args.batch,), 700.0)
            with torch.inference_mode():
                run_ref = lambda: ref(x, encoder_hidden_states=text, timestep=t,  # noqa: E731
                                      encoder_attention_mask=mask).sample
                run_ours = lambda: ours(x, t, text, mask)  # noqa: E731
                diff = (run_ref() - run_ours()).abs().max().item()
                ts = paired_times({"diffusers": run_ref, "ours": run_ours}, args.rounds)
            ratio = statistics.median(a / b for a, b in zip(ts["diffusers"], ts["ours"]))
            print(f"| {name} | {side * (n // side)} | {1e3 * statistics.median(ts['diffusers']):.1f} "
                  f"| {1e3 * statistics.median(ts['ours']):.1f} | {ratio:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
