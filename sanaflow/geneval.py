"""GenEval-style text-image alignment for flat coloured shapes (Ghosh et al. 2023, arXiv 2310.11513).

GenEval scores a text-to-image model by running an object detector on its images and checking each prompt's
structured requirement: which objects, how many, what colour, where. No downloaded detector is available here,
and the images are of `sanaflow.shapes` scenes, so a classical detector does the detecting: background colour
from the border, foreground by CIELAB distance, components, shape from contour geometry, colour by the nearest
palette entry. The checks follow GenEval's rules (`evaluation/evaluate_images.py`): counting is exact, other
categories need at least the named objects, colour needs at least `count` objects of that colour, and a
position holds between every pair of matching objects with GenEval's 0.1 box-size margin.

Prompts -> `prompt_set`; images -> `evaluate` / `evaluate_pipeline` -> `Report` -> `write_report`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from . import shapes as _shapes
from .shapes import (
    BACKGROUNDS,
    COLORS,
    HELD_OUT_PAIRS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    allowed_colors,
)

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
# Shape words that training captions never use (shapes' held-out vocabulary; "disc", "plus sign"). Taken from
# `shapes` so the two cannot drift; empty if shapes ever drops the table, and then held-out prompts differ from
# the in-distribution ones only in their colour-shape pairs.
HELD_OUT_SHAPE_WORDS: dict[str, str] = {s: w[0] for s, w in _shapes.HELD_OUT_SHAPE_WORDS.items()}
NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
COUNTS = (2, 3, 4)                   # GenEval's counting prompts ask for two to four objects
RELATION_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
POSITION_THRESHOLD = 0.1             # GenEval: centre offsets shrink by 0.1 x (sum of box sizes) before the test


# ################################################################################################################
# Prompts
# ################################################################################################################

@dataclass(frozen=True)
class Item:
    """`count` objects of `shape`; `color` None means any colour (it is then not scored)."""
    shape: str
    color: str | None
    count: int = 1

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"Item: shape={self.shape!r} is not one of {SHAPES}")
        if self.color is not None and self.color not in COLORS:
            raise ValueError(f"Item: color={self.color!r} is not one of {tuple(COLORS)}")
        if not 1 <= self.count <= max(NUMBER_WORDS):
            raise ValueError(f"Item: count={self.count} must be in 1..{max(NUMBER_WORDS)}")


@dataclass(frozen=True)
class Requirement:
    """What an image must show. `relation` r means items[0] r items[1] (e.g. "left of"); `exact` makes the
    counts exact (GenEval's counting category), otherwise they are minimums."""
    items: tuple[Item, ...]
    relation: str | None = None
    exact: bool = False

    def __post_init__(self):
        if not self.items:
            raise ValueError("Requirement: items=() must name at least one object")
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise ValueError(f"Requirement: relation={self.relation!r} is not one of {RELATIONS}")
            if len(self.items) != 2:
                raise ValueError(f"Requirement: relation={self.relation!r} needs exactly 2 items, "
                                 f"got {len(self.items)}")


@dataclass(frozen=True)
class EvalPrompt:
    category: str
    text: str
    requirement: Requirement

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"EvalPrompt: category={self.category!r} is not one of {CATEGORIES}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict) -> EvalPrompt:
        r = d["requirement"]
        req = Requirement(tuple(Item(**i) for i in r["items"]), r.get("relation"), bool(r.get("exact", False)))
        return EvalPrompt(d["category"], d["text"], req)


def _noun(shape: str, color: str | None, count: int = 1, words: dict[str, str] | None = None) -> str:
    """"a red star", "an orange circle", "three triangles"; `words` swaps shape names (held-out phrasings)."""
    noun = (words or {}).get(shape, shape)
    head = [color] if color else []
    if count == 1:
        first = (head or [noun])[0]
        return " ".join(["an" if first[0] in "aeiou" else "a"] + head + [noun])
    return " ".join([NUMBER_WORDS[count]] + head + [_plural(noun)])


def _plural(noun: str) -> str:
    """The caption grammar of `shapes`: last word + "es" after s or x, else + "s" ("crosses", "plus signs")."""
    return noun + ("es" if noun.endswith(("s", "x")) else "s")


def _paintable(colors: Iterable[str]) -> bool:
    """Whether some background allows every colour (scene_for must be able to draw the prompt)."""
    colors = set(colors)
    return any(colors <= set(allowed_colors(bg)) for bg in BACKGROUNDS)


def _candidates(category: str, held_out: bool) -> list[EvalPrompt]:
    """Every prompt of a category, in a fixed order.

    Coloured objects: held_out=False uses no pair of HELD_OUT_PAIRS; held_out=True needs at least one, like the
    held-out scenes of `shapes.random_scene`. Colourless prompts (two_objects, counting): held_out=True needs a
    held-out shape word ("a disc and a square", "three plus signs"); False uses only training words."""
    held = {tuple(p) for p in HELD_OUT_PAIRS}
    pairs = [(c, s) for s in SHAPES for c in COLORS if _paintable((c,))]
    words = HELD_OUT_SHAPE_WORDS if held_out else {}

    def keep_pairs(*ps: tuple[str, str]) -> bool:
        return any(p in held for p in ps) if held_out else not any(p in held for p in ps)

    def keep_shapes(*ss: str) -> bool:
        return any(x in words for x in ss) if held_out and words else True

    out = []
    if category == "single_object":
        # The colour is named so the text reads like a training caption; as in GenEval's single_object only the
        # object is scored (the `colors` category scores colour).
        out = [EvalPrompt(category, _noun(s, c), Requirement((Item(s, None),))) for c, s in pairs if keep_pairs((c, s))]
    elif category == "colors":
        out = [EvalPrompt(category, _noun(s, c), Requirement((Item(s, c),))) for c, s in pairs if keep_pairs((c, s))]
    elif category == "two_objects":
        for x in SHAPES:
            for y in SHAPES:
                if x != y and keep_shapes(x, y):
                    out.append(EvalPrompt(category, f"{_noun(x, None, 1, words)} and {_noun(y, None, 1, words)}",
                                          Requirement((Item(x, None), Item(y, None)))))
    elif category == "counting":
        out = [EvalPrompt(category, _noun(s, None, n, words), Requirement((Item(s, None, n),), exact=True))
               for s in SHAPES for n in COUNTS if keep_shapes(s)]
    elif category in ("position", "color_attr"):
        for c1, s1 in pairs:
            for c2, s2 in pairs:
                if (c1, s1) == (c2, s2) or not keep_pairs((c1, s1), (c2, s2)) or not _paintable((c1, c2)):
                    continue
                if category == "color_attr":
                    # GenEval's colour attribution names two different objects with two different colours.
                    if s1 != s2 and c1 != c2:
                        out.append(EvalPrompt(category, f"{_noun(s1, c1)} and {_noun(s2, c2)}",
                                              Requirement((Item(s1, c1), Item(s2, c2)))))
                else:
                    for rel in RELATIONS:
                        out.append(EvalPrompt(category, f"{_noun(s1, c1)} {RELATION_WORDS[rel]} {_noun(s2, c2)}",
                                              Requirement((Item(s1, c1), Item(s2, c2)), relation=rel)))
    return out


def prompt_set(held_out: bool, seed: int = 0, per_category: int = 50) -> list[EvalPrompt]:
    """Up to `per_category` distinct prompts for each of GenEval's six categories, in category order.

    held_out=False: in-distribution prompts (no held-out colour-shape pair, no held-out word). held_out=True:
    every coloured prompt contains a pair of `shapes.HELD_OUT_PAIRS` and every colourless one a held-out shape
    word, so no prompt describes a scene or wording seen in training. A category with fewer distinct prompts
    than `per_category` returns them all (held-out single_object and colors have one per held-out pair).
    Deterministic in `seed`."""
    if per_category < 1:
        raise ValueError(f"prompt_set: per_category={per_category} must be >= 1")
    out = []
    for k, category in enumerate(CATEGORIES):
        cands = _candidates(category, held_out)
        # One generator per category, so a change to one category never reorders another.
        order = np.random.default_rng([seed, k]).permutation(len(cands))
        out.extend(cands[i] for i in order[:per_category])
    return out


def save_prompts(path: str | Path, prompts: Sequence[EvalPrompt]) -> None:
    """JSON lines, one prompt per line."""
    Path(path).write_text("".join(json.dumps(p.to_json()) + "\n" for p in prompts))


def load_prompts(path: str | Path) -> list[EvalPrompt]:
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(EvalPrompt.from_json(json.loads(line)))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"load_prompts: {path}:{n}: {e}") from e
    return out


# ################################################################################################################
# Scenes that satisfy a prompt (clean references and negative controls)
# ################################################################################################################

def truth_detections(scene: Scene) -> list[Detection]:
    """The scene's objects as detections, boxes from the nominal diameter: what a perfect detector would say."""
    out = []
    for o in scene.objects:
        r = SIZES[o.size] / 2
        out.append(Detection(o.shape, o.color, o.x, o.y, math.pi * r * r, (o.x - r, o.y - r, o.x + r, o.y + r)))
    return out


def satisfies(prompt: EvalPrompt, scene: Scene) -> bool:
    """Whether a scene (not an image) meets the prompt's requirement."""
    return check(prompt, truth_detections(scene))


def _place(sizes: Sequence[float], rng: np.random.Generator, boxes: Sequence[tuple[float, float, float, float]],
           tries: int = 200, grid: int = 0) -> list[tuple[float, float]] | None:
    """Centres for objects of diameters `sizes`, each inside its (x0, y0, x1, y1) box and apart from the others
    by a gap of 0.04 of the image, so components never touch, even after blur. grid > 0: only cell centres
    (k + 0.5) / grid, as in `shapes.random_scene`."""
    placed: list[tuple[float, float, float]] = []
    centres = [(k + 0.5) / grid for k in range(grid)]
    for d, (x0, y0, x1, y1) in zip(sizes, boxes):
        edge = d / 2 + 0.02
        lo_x, hi_x, lo_y, hi_y = max(x0, edge), min(x1, 1 - edge), max(y0, edge), min(y1, 1 - edge)
        xs, ys = ([c for c in centres if lo <= c <= hi] for lo, hi in ((lo_x, hi_x), (lo_y, hi_y)))
        if lo_x > hi_x or lo_y > hi_y or (grid and not (xs and ys)):
            return None
        for _ in range(tries):
            if grid:
                x, y = xs[rng.integers(len(xs))], ys[rng.integers(len(ys))]
            else:
                x, y = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
            if all(math.hypot(x - px, y - py) > (d + pd) / 2 + 0.04 for px, py, pd in placed):
                placed.append((x, y, d))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def scene_for(prompt: EvalPrompt, rng: np.random.Generator, max_tries: int = 100, grid: int = 0) -> Scene:
    """A random scene showing exactly what the prompt asks (no extra objects), on a background that allows its
    colours. Unnamed colours are drawn from those allowed on that background. grid > 0: centres on the cell
    centres of a grid x grid lattice (the layout of `sanaflow data shapes --grid`)."""
    req = prompt.requirement
    named = {i.color for i in req.items if i.color}
    backgrounds = [bg for bg in BACKGROUNDS if named <= set(allowed_colors(bg))]
    if not backgrounds:
        raise ValueError(f"scene_for: no background allows the colours {sorted(named)} of {prompt.text!r}")
    size_names = list(SIZES)
    for _ in range(max_tries):
        bg = backgrounds[rng.integers(len(backgrounds))]
        palette = list(allowed_colors(bg))
        specs = [(i.shape, i.color or palette[rng.integers(len(palette))]) for i in req.items for _ in range(i.count)]
        # Many objects shrink so that they fit; a large object would leave no room for four.
        names = size_names if len(specs) <= 2 else size_names[:-1]
        sizes = [names[rng.integers(len(names))] for _ in specs]
        boxes = [(0.0, 0.0, 1.0, 1.0)] * len(specs)
        if req.relation is not None:
            # Subject in one half, reference in the other, roughly level on the other axis so the relation is
            # clear of GenEval's margin; `satisfies` below confirms it.
            lo, hi = (0.0, 0.5), (0.5, 1.0)
            mid = (0.25, 0.75)
            a, b = {"left of": ((*lo, *mid), (*hi, *mid)), "right of": ((*hi, *mid), (*lo, *mid)),
                    "above": ((*mid, *lo), (*mid, *hi)), "below": ((*mid, *hi), (*mid, *lo))}[req.relation]
            boxes = [(a[0], a[2], a[1], a[3]), (b[0], b[2], b[1], b[3])]
        centres = _place([SIZES[s] for s in sizes], rng, boxes, grid=grid)
        if centres is None:
            continue
        objs = tuple(ShapeObject(sh, c, sz, x, y) for (sh, c), sz, (x, y) in zip(specs, sizes, centres))
        scene = Scene(bg, objs)
        if req.relation is not None:
            # The detector's boxes are not the bounding circles (a triangle's box centre sits 0.25 R above its
            # drawn centre): keep the offset at most 27 degrees off the relation's axis, far from the 60-degree
            # limit of GenEval's rule, so a correct detection cannot flip the verdict.
            dx, dy = abs(objs[0].x - objs[1].x), abs(objs[0].y - objs[1].y)
            along, across = (dx, dy) if req.relation in ("left of", "right of") else (dy, dx)
            if across > 0.5 * along:
                continue
        if satisfies(prompt, scene):
            return scene
    raise RuntimeError(f"scene_for: no scene for {prompt.text!r} in max_tries={max_tries}")


# ################################################################################################################
# Detector
# ################################################################################################################

@dataclass(frozen=True)
class Detection:
    """One object. x, y: centroid as fractions of width/height (y down); area: fraction of the image;
    box: (x0, y0, x1, y1) fractions; color_error: CIELAB distance of its median colour to the palette entry;
    solidity: area / convex-hull area; harmonics: radial-signature amplitudes a3..a6 (see `_classify_shape`)."""
    shape: str
    color: str
    x: float
    y: float
    area: float
    box: tuple[float, float, float, float]
    color_error: float = 0.0
    solidity: float = 1.0
    harmonics: tuple[float, ...] = ()


def _lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8 -> CIELAB float32 with L in 0..100. cv2's 8-bit path (a table lookup) is 4x faster than its
    float path and quantises L to 0.4 and a, b to 1 unit, far below the 12-15 unit thresholds used here."""
    lab = cv2.cvtColor(np.ascontiguousarray(rgb, np.uint8).reshape(-1, 1, 3), cv2.COLOR_RGB2Lab)
    return (lab.reshape(np.shape(rgb)).astype(np.float32) - _LAB_OFFSET) * _LAB_SCALE


_LAB_OFFSET = np.array([0, 128, 128], np.float32)
_LAB_SCALE = np.array([100 / 255, 1, 1], np.float32)

_PALETTE_NAMES = tuple(COLORS)
_PALETTE_LAB = _lab(np.array([COLORS[c] for c in _PALETTE_NAMES], np.uint8))

FOREGROUND_DE = 15.0     # seed threshold: JPEG ringing and 5/255 noise stay below ~8 Delta-E on flat backgrounds
MIN_AREA = 0.0006        # drop components below this fraction of the image (a small star at 128 px is ~0.006)
PURE_DE = 12.0           # CIE76 radius around a palette colour that counts as that colour, not a blend
MIN_FLAT_BORDER = 0.5    # fraction of border pixels that must match the background colour (flat-background domain)
MIN_PURITY = 0.5         # fraction of an object's inner pixels within 2 x PURE_DE of its palette colour
MIN_SOLIDITY = 0.35      # the least solid shape, the star, measures >= 0.67; below this a part is a blend rim
# Radial harmonics measured on clean and blurred renders of every shape, size and background at 128 and 256 px
# (outlines from `_outline_mask`): a circle's strongest <= 0.007, a hexagon's a6 >= 0.047; a square's
# a4 <= 0.14, a cross's >= 0.29, a star's a5 >= 0.21.
UPSAMPLE, UPSAMPLE_BELOW = 4, 64   # outlines of parts whose crop is <= 64 px are traced at 4x
ROUND_HARMONIC = 0.025
CROSS_HARMONIC = 0.20


def _radial_harmonics(contour: np.ndarray, cx: float, cy: float, n: int = 256) -> np.ndarray:
    """Amplitudes a_k (k = 0..12) of the radius-vs-angle signature from the centroid, relative to the mean
    radius. A regular k-gon or k-pointed shape puts its energy at harmonic k whatever its rotation."""
    p = contour.reshape(-1, 2).astype(np.float64)
    ang = np.arctan2(p[:, 1] - cy, p[:, 0] - cx)
    rad = np.hypot(p[:, 0] - cx, p[:, 1] - cy)
    order = np.argsort(ang)
    grid = np.linspace(-np.pi, np.pi, n, endpoint=False)
    r = np.interp(grid, ang[order], rad[order], period=2 * np.pi)
    f = np.abs(np.fft.rfft(r))[:13] / n
    return 2 * f / max(f[0], 1e-9)


def _classify_shape(mask: np.ndarray) -> tuple[str, float, tuple[float, ...]]:
    """Shape from a binary mask by the strongest radial harmonic among 3, 4, 5, 6: none above ROUND_HARMONIC is
    a circle, 3 a triangle, 5 a star, 6 a hexagon, and 4 a square or, when much stronger (arms reach out to
    the bounding circle and back to 0.45 of it), a cross. Solidity (area / convex-hull area) is returned as
    well; the detector uses it only to drop blend rims. Vertex counts of cv2.approxPolyDP and solidity
    thresholds were tried first: a small star at 128 px has solidity up to 0.90 and its polygon fit varies with
    blur, while the harmonics average over the whole outline (measured ranges on the right of the constants)."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    c = max(contours, key=cv2.contourArea)
    m = cv2.moments(mask, binaryImage=True)
    # contour points are pixel centres, so the centroid is taken in the same coordinates
    cx, cy = m["m10"] / m["m00"], m["m01"] / m["m00"]
    hull = cv2.convexHull(c)
    # Pixel-count area against the hull of the pixel-centre outline plus half a pixel of border (perimeter / 2),
    # so a solid convex blob scores ~1 at any size.
    solidity = float(m["m00"] / max(cv2.contourArea(hull) + cv2.arcLength(hull, True) / 2 + 1, 1.0))
    a = _radial_harmonics(c, cx, cy)
    harm = tuple(float(v) for v in a[3:7])
    k = max((3, 4, 5, 6), key=lambda j: a[j])
    if a[k] < ROUND_HARMONIC:
        return "circle", solidity, harm
    if k == 4:
        return ("cross" if a[4] > CROSS_HARMONIC else "square"), solidity, harm
    return {3: "triangle", 5: "star", 6: "hexagon"}[k], solidity, harm


def _outline_mask(crop: np.ndarray, bg: np.ndarray, color: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The part's mask redrawn at UPSAMPLE x from its soft coverage (each pixel's position between background
    and object colour), cut at one half. A 16-pixel hexagon differs from a disc by less than a pixel; the
    pixel-grid outline hides that, the coverage-interpolated one keeps it (JPEG at 128 px: 93 -> 99 %)."""
    if max(mask.shape) > UPSAMPLE_BELOW:
        return mask
    axis = color - bg
    cover = np.clip(((crop - bg) @ axis) / max(float(axis @ axis), 1e-6), 0, 1).astype(np.float32)
    cover *= cv2.dilate(mask, np.ones((3, 3), np.uint8))        # neighbours stay out of this part's outline
    h, w = mask.shape
    big = cv2.resize(cover, (w * UPSAMPLE, h * UPSAMPLE), interpolation=cv2.INTER_LINEAR)
    return (big > 0.5).astype(np.uint8)


def _nearest_color(lab: np.ndarray) -> tuple[int, float]:
    d = np.linalg.norm(_PALETTE_LAB - lab, axis=1)
    i = int(np.argmin(d))
    return i, float(d[i])


def detect(image: np.ndarray, min_area: float = MIN_AREA) -> list[Detection]:
    """Objects in an (H, W, 3) uint8 RGB image of a flat background with flat shapes on it.

    1. background = per-channel median of the 2-pixel border, in CIELAB;
    2. seeds = pixels > FOREGROUND_DE from it, opened with a 3x3 kernel (kills noise and JPEG specks);
    3. per seed component: palette labels of its eroded core give the colours present (several when objects
       of different colours touch); the median core colour of each is a prototype, and every pixel near the
       component goes to the nearest of background and prototypes -- a half-way threshold that keeps the
       outline where it was under blur and anti-aliasing;
    4. per colour and connected part >= min_area (fraction of the image): colour = palette entry nearest its
       median core colour; shape = `_classify_shape` of the outline traced at 4x from the soft coverage
       (`_outline_mask`); parts with solidity < MIN_SOLIDITY are blend rims and dropped.
    An object touching another of the same colour merges with it (counts then fall short)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"detect: image of shape {image.shape}, dtype {image.dtype}: must be (H, W, 3) uint8")
    H, W = image.shape[:2]
    lab = _lab(image)
    border = np.concatenate([lab[:2].reshape(-1, 3), lab[-2:].reshape(-1, 3), lab[:, :2].reshape(-1, 3),
                             lab[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    # No flat background, no objects: GenEval's detector has a confidence threshold; ours is that the scene looks
    # like the domain at all. Without this, noise or texture yields blobs that pass "a red star" by chance.
    if np.mean(np.linalg.norm(border - bg, axis=1) < FOREGROUND_DE) < MIN_FLAT_BORDER:
        return []
    diff = lab - bg
    dist2 = np.einsum("hwc,hwc->hw", diff, diff)
    k3 = np.ones((3, 3), np.uint8)
    seeds = cv2.morphologyEx((dist2 > FOREGROUND_DE ** 2).astype(np.uint8), cv2.MORPH_OPEN, k3)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(seeds, connectivity=8)
    min_px = max(min_area * H * W, 4.0)
    out = []
    for i in range(1, n):
        x0, y0, w, h, area = stats[i]
        if area < min_px:
            continue
        pad = 3
        xa, ya, xb, yb = max(x0 - pad, 0), max(y0 - pad, 0), min(x0 + w + pad, W), min(y0 + h + pad, H)
        comp = (labels[ya:yb, xa:xb] == i).astype(np.uint8)
        crop = lab[ya:yb, xa:xb]
        core = cv2.erode(comp, k3)
        if core.sum() < max(min_px / 4, 4):
            core = comp
        core_lab = crop[core.astype(bool)]
        pd = np.linalg.norm(core_lab[:, None, :] - _PALETTE_LAB[None], axis=2)
        names = np.argmin(pd, axis=1)
        # A second colour counts only with enough pixels near its palette entry: blur mixes an object with the
        # background into a rim of in-between colours (red on gray reads brown) that must not become an object.
        pure = np.bincount(names[pd.min(axis=1) < PURE_DE], minlength=len(_PALETTE_NAMES))
        top = int(np.argmax(np.bincount(names, minlength=len(_PALETTE_NAMES))))
        present = [top] + [j for j in np.argsort(-pure) if j != top and pure[j] >= max(min_px / 2, 0.05 * len(names))]
        protos = np.stack([bg] + [np.median(core_lab[names == j], axis=0) for j in present])
        region = cv2.dilate(comp, k3, iterations=2).astype(bool)
        nearest = np.argmin(np.linalg.norm(crop[:, :, None, :] - protos[None, None], axis=3), axis=2)
        for p in range(1, len(protos)):
            part = ((nearest == p) & region).astype(np.uint8)
            part = cv2.morphologyEx(part, cv2.MORPH_OPEN, k3) if part.sum() > 4 * min_px else part
            m, plabels, pstats, _ = cv2.connectedComponentsWithStats(part, connectivity=8)
            for q in range(1, m):
                if pstats[q, 4] < min_px:
                    continue
                mask = (plabels == q).astype(np.uint8)
                inner = cv2.erode(mask, k3)
                sel = inner.astype(bool) if inner.sum() >= 4 else mask.astype(bool)
                ci, cerr = _nearest_color(np.median(crop[sel], axis=0))
                # A flat object is mostly one palette colour; a textured blob is not (the same confidence idea).
                purity = np.mean(np.linalg.norm(crop[sel] - _PALETTE_LAB[ci], axis=1) < 2 * PURE_DE)
                if purity < MIN_PURITY:
                    continue
                shape, solidity, harm = _classify_shape(_outline_mask(crop, bg, protos[p], mask))
                if solidity < MIN_SOLIDITY:
                    continue
                mom = cv2.moments(mask, binaryImage=True)
                qx, qy, qw, qh, qa = pstats[q]
                out.append(Detection(
                    shape, _PALETTE_NAMES[ci],
                    (xa + mom["m10"] / mom["m00"] + 0.5) / W, (ya + mom["m01"] / mom["m00"] + 0.5) / H,
                    float(qa) / (H * W),
                    ((xa + qx) / W, (ya + qy) / H, (xa + qx + qw) / W, (ya + qy + qh) / H),
                    cerr, solidity, harm))
    return out


# ################################################################################################################
# GenEval rules
# ################################################################################################################

def relative_position(a: Detection, b: Detection) -> set[str]:
    """GenEval's `relative_position`: relations of a to b from box centres, after shrinking the offset by
    POSITION_THRESHOLD x (sum of box sizes) on each axis; a relation holds when its axis carries > 0.5 of the
    offset's direction."""
    ca = np.array([(a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2])
    cb = np.array([(b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2])
    dims = np.array([a.box[2] - a.box[0] + b.box[2] - b.box[0], a.box[3] - a.box[1] + b.box[3] - b.box[1]])
    offset = ca - cb
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def check(prompt: EvalPrompt, detections: Sequence[Detection]) -> bool:
    """GenEval's verdict: for each item, the objects of its shape number >= count (== count when exact), and
    at least `count` of them have its colour; for a relation, every matching subject stands in it to every
    matching reference. Objects of shapes the prompt does not name are ignored, as GenEval ignores classes."""
    req = prompt.requirement
    matched = []
    for item in req.items:
        same_shape = [d for d in detections if d.shape == item.shape]
        if len(same_shape) < item.count or (req.exact and len(same_shape) != item.count):
            return False
        good = [d for d in same_shape if item.color is None or d.color == item.color]
        if len(good) < item.count:
            return False
        matched.append(good)
    if req.relation is not None:
        return all(req.relation in relative_position(a, b) for a in matched[0] for b in matched[1])
    return True


def items_found(prompt: EvalPrompt, detections: Sequence[Detection]) -> tuple[int, int]:
    """Partial credit: of the prompt's items, how many have at least `count` objects of their shape, and how many
    at least `count` of their shape and colour (counts as minimums, relations ignored). Not a GenEval score; it
    separates models that GenEval scores all near 0 (sanaflow's own addition)."""
    shape = both = 0
    for item in prompt.requirement.items:
        same = [d for d in detections if d.shape == item.shape]
        shape += len(same) >= item.count
        both += sum(item.color is None or d.color == item.color for d in same) >= item.count
    return shape, both


# ################################################################################################################
# Evaluation and report
# ################################################################################################################

THUMB = 64


@dataclass(frozen=True)
class ImageResult:
    prompt: EvalPrompt
    index: int                      # image number within its prompt
    passed: bool
    detections: tuple[Detection, ...]
    thumbnail: np.ndarray = field(repr=False, compare=False)   # THUMB x THUMB uint8, for grid.png


@dataclass(frozen=True)
class Report:
    results: tuple[ImageResult, ...]
    images_per_prompt: int

    def category_scores(self) -> dict[str, dict]:
        """category -> prompts, images, passed, accuracy (fraction of images that pass, GenEval's task score)."""
        out = {}
        for cat in CATEGORIES:
            rs = [r for r in self.results if r.prompt.category == cat]
            if rs:
                passed = sum(r.passed for r in rs)
                out[cat] = {"prompts": len({r.prompt for r in rs}), "images": len(rs), "passed": passed,
                            "accuracy": passed / len(rs)}
        return out

    @property
    def overall(self) -> float:
        """GenEval's overall score: the mean of the task scores (each category weighs the same)."""
        s = self.category_scores()
        return float(np.mean([v["accuracy"] for v in s.values()])) if s else float("nan")

    @property
    def image_accuracy(self) -> float:
        return sum(r.passed for r in self.results) / len(self.results) if self.results else float("nan")

    def item_recall(self) -> dict[str, float]:
        """Over all images and the items their prompts name: the fraction found with their shape ("shape") and
        with their shape and colour ("shape_color"); see `items_found`."""
        found = [items_found(r.prompt, r.detections) for r in self.results]
        items = sum(len(r.prompt.requirement.items) for r in self.results)
        if not items:
            return {"shape": float("nan"), "shape_color": float("nan")}
        return {"shape": sum(f[0] for f in found) / items, "shape_color": sum(f[1] for f in found) / items}


def _thumb(image: np.ndarray) -> np.ndarray:
    return cv2.resize(image, (THUMB, THUMB), interpolation=cv2.INTER_AREA)


def evaluate(images_by_prompt: dict[EvalPrompt, Sequence[np.ndarray]]
             | Iterable[tuple[EvalPrompt, Sequence[np.ndarray]]]) -> Report:
    """Detect and check every image. Accepts {prompt: images} or (prompt, images) pairs; every prompt must have
    the same number of images (GenEval uses 4), so that per-prompt and per-image rates agree."""
    pairs = list(images_by_prompt.items() if isinstance(images_by_prompt, dict) else images_by_prompt)
    results, per = [], None
    for prompt, images in pairs:
        images = list(images)
        if per is None:
            per = len(images)
        if len(images) != per or per == 0:
            raise ValueError(f"evaluate: {prompt.text!r} has {len(images)} images; every prompt needs the same "
                             f"number >= 1 (first prompt had {per})")
        for j, im in enumerate(images):
            dets = detect(im)
            results.append(ImageResult(prompt, j, check(prompt, dets), tuple(dets), _thumb(im)))
    return Report(tuple(results), per or 0)


def evaluate_pipeline(generate_fn: Callable[[list[str], list[int]], np.ndarray], prompts: Sequence[EvalPrompt],
                      images_per_prompt: int = 4, seed: int = 0, batch_size: int = 16) -> Report:
    """Generate and evaluate. generate_fn(texts, seeds) -> (B, H, W, 3) uint8; image j of prompt i uses seed
    seed + i * images_per_prompt + j, so a run is reproducible at any batch size."""
    if images_per_prompt < 1:
        raise ValueError(f"evaluate_pipeline: images_per_prompt={images_per_prompt} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"evaluate_pipeline: batch_size={batch_size} must be >= 1")
    jobs = [(i, j) for i in range(len(prompts)) for j in range(images_per_prompt)]
    images: dict[int, list[np.ndarray]] = {i: [] for i in range(len(prompts))}
    for s in range(0, len(jobs), batch_size):
        chunk = jobs[s:s + batch_size]
        out = np.asarray(generate_fn([prompts[i].text for i, _ in chunk],
                                     [seed + i * images_per_prompt + j for i, j in chunk]))
        if out.ndim != 4 or out.shape[0] != len(chunk) or out.shape[3] != 3 or out.dtype != np.uint8:
            raise ValueError(f"evaluate_pipeline: generate_fn returned {out.shape} {out.dtype}; "
                             f"expected ({len(chunk)}, H, W, 3) uint8")
        for (i, _), im in zip(chunk, out):
            images[i].append(im)
    return evaluate([(p, images[i]) for i, p in enumerate(prompts)])


def _detection_json(d: Detection) -> dict:
    return {"shape": d.shape, "color": d.color, "x": round(d.x, 4), "y": round(d.y, 4), "area": round(d.area, 5),
            "box": [round(v, 4) for v in d.box], "color_error": round(d.color_error, 2),
            "solidity": round(d.solidity, 3)}


def write_report(report: Report, out_dir: str | Path, grid_prompts_per_category: int = 4) -> Path:
    """report.json (scores and every image's verdict and detections), report.md (tables) and grid.png (the first
    `grid_prompts_per_category` prompts of each category, one row each, green border = pass, red = fail)."""
    from PIL import Image, ImageDraw

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scores, recall = report.category_scores(), report.item_recall()
    doc = {"images_per_prompt": report.images_per_prompt, "overall": report.overall,
           "image_accuracy": report.image_accuracy, "item_recall": recall, "categories": scores,
           "results": [{"category": r.prompt.category, "text": r.prompt.text, "image": r.index, "passed": r.passed,
                        "detections": [_detection_json(d) for d in r.detections]} for r in report.results]}
    (out / "report.json").write_text(json.dumps(doc, indent=1))

    lines = ["# GenEval-style alignment (classical shape detector)", "",
             (f"{report.images_per_prompt} images per prompt. Overall = mean of the category accuracies "
              f"(GenEval); image accuracy = {report.image_accuracy:.3f}."),
             (f"Item recall (partial credit, not GenEval: the named objects found, counts as minimums, relations "
              f"ignored): {recall['shape']:.3f} by shape, {recall['shape_color']:.3f} by shape and colour."), "",
             "| category | prompts | images | passed | accuracy |", "|---|---:|---:|---:|---:|"]
    for cat, s in scores.items():
        lines.append(f"| {cat} | {s['prompts']} | {s['images']} | {s['passed']} | {s['accuracy']:.3f} |")
    lines += [(f"| **overall** | {sum(s['prompts'] for s in scores.values())} | "
               f"{sum(s['images'] for s in scores.values())} | {sum(s['passed'] for s in scores.values())} | "
               f"**{report.overall:.3f}** |"), ""]
    for cat in scores:
        lines += [f"## {cat}", "", "| prompt | passed |", "|---|---:|"]
        per_prompt: dict[str, list[bool]] = {}
        for r in report.results:
            if r.prompt.category == cat:
                per_prompt.setdefault(r.prompt.text, []).append(r.passed)
        lines += [f"| {t} | {sum(v)}/{len(v)} |" for t, v in per_prompt.items()] + [""]
    (out / "report.md").write_text("\n".join(lines))

    rows: list[list[ImageResult]] = []
    for cat in CATEGORIES:
        seen: dict[EvalPrompt, list[ImageResult]] = {}
        for r in report.results:
            if r.prompt.category == cat and (r.prompt in seen or len(seen) < grid_prompts_per_category):
                seen.setdefault(r.prompt, []).append(r)
        rows.extend(seen.values())
    b, cell = 3, THUMB + 6
    ncol = max((len(r) for r in rows), default=1)
    grid = Image.new("RGB", (ncol * cell, max(len(rows), 1) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        for j, r in enumerate(row):
            x, y = j * cell, i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(0, 170, 0) if r.passed else (210, 0, 0))
            grid.paste(Image.fromarray(r.thumbnail), (x + b, y + b))
    grid.save(out / "grid.png")
    return out
