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
The rows "held-out word" test the probe fitted on training words on captions that name the first shape with a word of
the held-out split ("disc" for circle, "plus sign" for cross, `shapes.HELD_OUT_SHAPE_WORDS`): whether the encoder
puts an unseen synonym where its training word is, which a DiT needs to follow held-out prompts (its accuracy is over
those captions only; chance is 1/6).
The row "first shape token: the other object's colour" is a control: a causal encoder's token cannot know a word
that comes after it, so its probe must stay at chance (1/8).
"""
from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import torch

from sanaflow.shapes import COLORS, HELD_OUT_SHAPE_WORDS, SHAPES
from sanaflow.text import TextConfig, TextEncoder

COLOR_NAMES = list(COLORS)
RELATIONS = ("to the left of", "to the right of", "above", "below")


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, classes: int, fit: int,
                   x_test: torch.Tensor | None = None, y_test: torch.Tensor | None = None) -> float:
    """Fitted on the first `fit` rows; tested on the rest, or on (x_test, y_test) if given."""
    if x_test is None:
        x, y, x_test, y_test = x[:fit], y[:fit], x[fit:], y[fit:]
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)

    def design(v: torch.Tensor) -> torch.Tensor:                                 # (n, D + 1) with a bias column
        return torch.cat([(v - mean) / std, torch.ones(len(v), 1)], 1).double()
    a, target = design(x), torch.nn.functional.one_hot(y, classes).double()
    w = torch.linalg.solve(a.T @ a + torch.eye(a.shape[1], dtype=a.dtype), a.T @ target)
    return float(((design(x_test) @ w).argmax(1) == y_test).double().mean())


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
    # The same kind of caption with the first shape written in a held-out word: circles and crosses only.
    held_rows = [r for r in rows[fit:] if r[2] in HELD_OUT_SHAPE_WORDS]

    def features(rows, word) -> tuple[torch.Tensor, torch.Tensor]:
        captions = [f"a {c1} {word(s1)} {rel} a {c2} {s2}" for c1, c2, s1, s2, rel in rows]
        first, last = [], []
        for i in range(0, len(rows), 200):
            emb, mask = enc.encode(captions[i:i + 200])                           # (b, N, D), (b, N)
            for j in range(len(emb)):
                c1, _, s1, _, _ = rows[i + j]
                k = len(enc.tokenizer(f"a {c1} {word(s1)}").input_ids) - 1        # last token of the first shape
                first.append(emb[j, k].float())
                last.append(emb[j, int(mask[j].sum()) - 1].float())                # last token: sees the caption
        return torch.stack(first), torch.stack(last)

    first, last = features(rows, lambda s: s)
    held_first, held_last = features(held_rows, lambda s: HELD_OUT_SHAPE_WORDS[s][0])
    held_shape = torch.tensor([SHAPES.index(r[2]) for r in held_rows])
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
    shape = torch.tensor([label["shape"](r) for r in rows])
    for name, x, x_held in (("first shape token", first, held_first), ("last token", last, held_last)):
        acc = probe_accuracy(x[:fit], shape[:fit], len(SHAPES), fit, x_held, held_shape)
        out[f"{name}: the first shape, held-out word ({len(held_rows)} captions)"] = (acc, float("nan"), float("nan"))
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
            shares = " | ".join("-" if math.isnan(v) else f"{v:.3f}" for v in (share, unrelated))   # nan: not measured
            print(f"| {folder} | {name} | {acc:.3f} | {shares} |")


if __name__ == "__main__":
    main()
