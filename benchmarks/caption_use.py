"""Does a trained DiT read its captions? Its flow-matching loss with the right caption, another image's, or none.

    python benchmarks/caption_use.py --run runs/shapes-dit-g8-one --model runs/handoff/one-raw

Takes `--captions` captions at random from the run's cache (RUN/cache/dit.safetensors: the latents and caption
embeddings it trained on), fixed noise, and for each t the MSE of the DiT's velocity against noise - x0 with (a) the
image's own caption, (b) the caption of another image in the sample, (c) the empty prompt. (b) - (a) is how much the
caption is worth to the model at that t; a model that ignores its text has (a) = (b). Cheap: a few forward passes
(docs/bundled-model.md, ninth round).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from sanaflow.flow import flow_path, network_time, velocity_target
from sanaflow.hub import load_dit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a DiT training run (for its cache)")
    ap.add_argument("--model", required=True, help="a pipeline folder whose transformer/ to test")
    ap.add_argument("--captions", type=int, default=256)
    ap.add_argument("--times", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cache = Path(args.run) / "cache" / "dit.safetensors"
    if not cache.is_file():
        ap.error(f"--run {args.run}: no {cache} (the run builds it when it starts)")
    torch.set_grad_enabled(False)

    d = load_file(cache)
    dit = load_dit(Path(args.model) / "transformer").eval()
    g = torch.Generator().manual_seed(args.seed)
    picks = torch.randperm(len(d["caption_image"]), generator=g)[:args.captions]
    images = d["caption_image"][picks]
    keep = torch.cat([torch.tensor([True]), images[1:] != images[:-1]])  # (b) must name a different image
    picks, images = picks[keep], images[keep]
    n = len(picks)
    x0 = d["latents"][images].float()
    text, mask = d["text"][picks].float(), d["text_mask"][picks]
    other = torch.roll(torch.arange(n), 1)                                    # the previous pick's caption
    null = d["null_text"].float().expand(n, -1, -1)
    null_mask = d["null_mask"].expand(n, -1)
    noise = torch.randn(x0.shape, generator=g)
    target = velocity_target(x0, noise)

    def mse(t: float, tx: torch.Tensor, m: torch.Tensor) -> float:
        tt = torch.full((n,), t)
        x_t, ts = flow_path(x0, noise, tt), network_time(tt, True)
        v = torch.cat([dit(x_t[i:i + args.batch], ts[i:i + args.batch], tx[i:i + args.batch], m[i:i + args.batch])
                       for i in range(0, n, args.batch)])
        return (v.float() - target).square().mean().item()

    print(f"{args.model} on {n} captions of {args.run}'s cache: MSE of v\n")
    print("| t | own caption | another image's | empty | another - own |")
    print("|---:|---:|---:|---:|---:|")
    for t in args.times:
        own, oth, emp = mse(t, text, mask), mse(t, text[other], mask[other]), mse(t, null, null_mask)
        print(f"| {t:.2f} | {own:.4f} | {oth:.4f} | {emp:.4f} | {oth - own:+.4f} |", flush=True)


if __name__ == "__main__":
    main()
