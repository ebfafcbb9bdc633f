"""Does the text encoder's output say which colour belongs to which shape, and which object is where?

    python benchmarks/text_binding.py --text runs/shapes-text/model [--text runs/other/model ...]

The DiT reads the caption through cross-attention, which has no notion of token order: it sees the set of token
features. It can bind "red" to "circle" in "a red circle left of a blue square" only if the features carry the
binding, e.g. the feature of "circle" says "red". On captions `a C1 S1 <relation> a C2 S2` (random colours, shapes
and relations), two measurements per property:

- probe: test accuracy of a ridge-regression linear probe (2000 captions to fit, 400 to test) from one token's
  feature. It says whether the information is there at all.
- share: the fraction of that token's feature variance explained by the property (between-class variance over
  total variance; the last column is the same with the labels shuffled, what a feature unrelated to the property
  gives). It says how loud the information is: a DiT trained from scratch finds a loud direction sooner than a
  faint one.
The row "first shape token: the other object's colour" is a control: a causal encoder's token cannot know a word
that comes after it, so its probe must stay at chance (1/8).
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from sanaflow.shapes import COLORS, SHAPES
from sanaflow.text import TextConfig, TextEncoder

COLOR_NAMES = list(COLORS)
RELATIONS = ("to the left of", "to the right of", "above", "below")


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, classes: int, fit: int) -> float:
    x = (x - x[:fit].mean(0)) / x[:fit].std(0).clamp(min=1e-6)
    x = torch.cat([x, torch.ones(len(x), 1)], 1)                                 # (n, D + 1) with a bias column
    target = torch.nn.functional.one_hot(y, classes).double()
    a = x[:fit].double()
    w = torch.linalg.solve(a.T @ a + torch.eye(a.shape[1], dtype=a.dtype), a.T @ target[:fit])
    return float(((x[fit:].double() @ w).argmax(1) == y[fit:]).double().mean())


def variance_share(x: torch.Tensor, y: torch.Tensor) -> float:
    x = x.double() - x.double().mean(0)
    between = sum(float((y == c).sum()) * x[y == c].mean(0).pow(2).sum() for c in y.unique())
    return float(between / x.pow(2).sum())


@torch.no_grad()
def measure(folder: Path, n: int, fit: int, seed: int) -> dict[str, tuple[float, float]]:
    enc = TextEncoder.from_pretrained(folder / "text_encoder", folder / "tokenizer",
                                      config=TextConfig(max_length=64, chi=None))
    rng = random.Random(seed)
    rows = [(*rng.sample(COLOR_NAMES, 2), *rng.sample(SHAPES, 2), rng.choice(RELATIONS)) for _ in range(n)]
    captions = [f"a {c1} {s1} {rel} a {c2} {s2}" for c1, c2, s1, s2, rel in rows]
    first, last = [], []
    for i in range(0, n, 200):
        emb, mask = enc.encode(captions[i:i + 200])                               # (b, N, D), (b, N)
        for j in range(len(emb)):
            c1, _, s1, _, _ = rows[i + j]
            k = len(enc.tokenizer(f"a {c1} {s1}").input_ids) - 1                  # last token of the first shape
            first.append(emb[j, k].float())
            last.append(emb[j, int(mask[j].sum()) - 1].float())                    # last token: sees the caption
    first, last = torch.stack(first), torch.stack(last)
    label = {"colour": lambda r: COLOR_NAMES.index(r[0]), "other colour": lambda r: COLOR_NAMES.index(r[1]),
             "shape": lambda r: SHAPES.index(r[2]), "relation": lambda r: RELATIONS.index(r[4])}
    classes = {"colour": len(COLOR_NAMES), "other colour": len(COLOR_NAMES), "shape": len(SHAPES),
               "relation": len(RELATIONS)}
    cases = {"first shape token: its colour": (first, "colour"),
             "first shape token: the other object's colour": (first, "other colour"),
             "last token: the first object's colour": (last, "colour"),
             "last token: the first object's shape": (last, "shape"),
             "last token: the relation": (last, "relation")}
    out = {}
    for name, (x, key) in cases.items():
        y = torch.tensor([label[key](r) for r in rows])
        shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]
        out[name] = (probe_accuracy(x, y, classes[key], fit), variance_share(x, y), variance_share(x, shuffled))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=Path, nargs="+", required=True, help="folders with text_encoder/ and tokenizer/")
    ap.add_argument("--captions", type=int, default=2400)
    ap.add_argument("--fit", type=int, default=2000, help="captions the probe is fitted on; the rest test it")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    print("| text encoder | token: property | probe accuracy | variance share | share, labels shuffled |")
    print("|---|---|---:|---:|---:|")
    for folder in args.text:
        for name, (acc, share, unrelated) in measure(folder, args.captions, args.fit, args.seed).items():
            print(f"| {folder} | {name} | {acc:.3f} | {share:.3f} | {unrelated:.3f} |")


if __name__ == "__main__":
    main()
