"""A synthetic compositional text-image data set: flat coloured shapes on plain backgrounds, with captions.

No image data can be downloaded, so the bundled model trains on scenes drawn here and the offline GenEval-style
evaluator (`sanaflow/geneval.py`) checks generated images against prompts built from the same vocabulary.

    scene = random_scene(rng)                 # 1-4 non-overlapping objects on one background
    image = render(scene, 256)                # (256, 256, 3) uint8, anti-aliased, deterministic
    caps = captions(scene, rng)               # [(text, score), ...], score = fraction of the scene described

Colour separation (CIEDE2000, `delta_e`): every pair of object colours is >= MIN_COLOR_DE apart, and an object
colour appears on a background only when it is >= MIN_BACKGROUND_DE from it (`allowed_colors`), so a detector
that thresholds colour distance always finds every object.

Held-out split: scenes containing a pair in HELD_OUT_PAIRS, and the phrasings in the `_HELD_OUT_*` tables,
appear only with `held_out=True`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 30),
    "green": (30, 140, 55),
    "blue": (35, 85, 215),
    "purple": (145, 40, 165),
    "pink": (245, 130, 200),
    "brown": (125, 75, 35),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (175, 175, 175),
    "beige": (232, 218, 185),
}
# Object diameter as a fraction of the image side. Steps of ~1.5x keep sizes distinct after a detector's
# bounding box; 0.30 (not larger) so that four large objects still fit with margins in the unit square.
SIZES: dict[str, float] = {"small": 0.14, "medium": 0.21, "large": 0.30}
RELATIONS = ("left of", "right of", "above", "below")

# (colour, shape) pairs that never occur in training scenes; held-out scenes contain at least one.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({("green", "star"), ("pink", "hexagon"),
                                                        ("brown", "triangle")})

MIN_COLOR_DE = 20.0          # CIEDE2000 between any two object colours (checked at import)
MIN_BACKGROUND_DE = 35.0     # CIEDE2000 an object colour needs to appear on a background
RELATION_MARGIN = 0.15       # centres must differ by this (fraction of the side) for a caption to state a relation
EDGE_MARGIN = 0.02           # gap between an object's bounding circle and the image border
GAP = 0.03                   # gap between the bounding circles of two objects
MAX_OBJECTS = 4
SUPERSAMPLE = 4              # draw at 4x, box-filter down: anti-aliasing, and fully covered pixels stay exact


# ---------------------------------------------------------------------------------------------------------------
# Colour science: sRGB -> CIELAB (D65) and CIEDE2000 (Sharma, Wu & Dalal 2005)
# ---------------------------------------------------------------------------------------------------------------

def srgb_to_lab(rgb) -> np.ndarray:
    """(..., 3) sRGB in 0..255 -> (..., 3) CIELAB under D65."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def delta_e(rgb1, rgb2) -> float:
    """CIEDE2000 colour difference of two sRGB colours. Used instead of plain Lab distance (CIE76) because CIE76
    overrates chroma: it puts yellow 84 units from white although the two are hard to tell apart by lightness."""
    return ciede2000(srgb_to_lab(rgb1), srgb_to_lab(rgb2))


def ciede2000(lab1, lab2) -> float:
    """CIEDE2000 difference of two CIELAB colours (Sharma, Wu & Dalal 2005, Eqs. 1-22)."""
    (l1, a1, b1), (l2, a2, b2) = lab1, lab2
    c_bar = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_bar ** 7 / (c_bar ** 7 + 25.0 ** 7)))
    a1p, a2p = a1 * (1 + g), a2 * (1 + g)
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p, h2p = np.degrees(np.arctan2(b1, a1p)) % 360, np.degrees(np.arctan2(b2, a2p)) % 360
    dlp, dcp = l2 - l1, c2p - c1p
    dh = h2p - h1p
    if c1p * c2p == 0:
        dh = 0.0
    elif dh > 180:
        dh -= 360
    elif dh < -180:
        dh += 360
    dhp = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh / 2))
    lp_bar, cp_bar = (l1 + l2) / 2, (c1p + c2p) / 2
    if c1p * c2p == 0:
        hp_bar = h1p + h2p
    elif abs(h1p - h2p) <= 180:
        hp_bar = (h1p + h2p) / 2
    else:
        hp_bar = (h1p + h2p + 360) / 2 if h1p + h2p < 360 else (h1p + h2p - 360) / 2
    t = (1 - 0.17 * np.cos(np.radians(hp_bar - 30)) + 0.24 * np.cos(np.radians(2 * hp_bar))
         + 0.32 * np.cos(np.radians(3 * hp_bar + 6)) - 0.20 * np.cos(np.radians(4 * hp_bar - 63)))
    d_theta = 30 * np.exp(-(((hp_bar - 275) / 25) ** 2))
    rc = 2 * np.sqrt(cp_bar ** 7 / (cp_bar ** 7 + 25.0 ** 7))
    sl = 1 + 0.015 * (lp_bar - 50) ** 2 / np.sqrt(20 + (lp_bar - 50) ** 2)
    sc, sh = 1 + 0.045 * cp_bar, 1 + 0.015 * cp_bar * t
    rt = -np.sin(np.radians(2 * d_theta)) * rc
    return float(np.sqrt((dlp / sl) ** 2 + (dcp / sc) ** 2 + (dhp / sh) ** 2 + rt * (dcp / sc) * (dhp / sh)))


ALLOWED_COLORS: dict[str, tuple[str, ...]] = {
    bg: tuple(c for c, rgb in COLORS.items() if delta_e(rgb, bg_rgb) >= MIN_BACKGROUND_DE)
    for bg, bg_rgb in BACKGROUNDS.items()
}


def allowed_colors(background: str) -> tuple[str, ...]:
    """Object colours that may appear on `background` (CIEDE2000 >= MIN_BACKGROUND_DE from it)."""
    if background not in ALLOWED_COLORS:
        raise ValueError(f"allowed_colors: background={background!r} is not one of {tuple(BACKGROUNDS)}")
    return ALLOWED_COLORS[background]


def _check_palette() -> None:
    names = list(COLORS)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if delta_e(COLORS[a], COLORS[b]) < MIN_COLOR_DE:
                raise ValueError(f"COLORS: {a!r} and {b!r} are closer than MIN_COLOR_DE={MIN_COLOR_DE}")
    for bg, colors in ALLOWED_COLORS.items():
        # a held-out scene must be possible on every background, and every background needs >= 4 colours
        if len(colors) < 4 or not any(c in colors for c, _ in HELD_OUT_PAIRS):
            raise ValueError(f"BACKGROUNDS: {bg!r} allows too few colours: {colors}")


_check_palette()


# ---------------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    x: float            # centre, fraction of the width
    y: float            # centre, fraction of the height; grows downwards

    @property
    def radius(self) -> float:
        """Radius of the bounding circle every shape is drawn inside, as a fraction of the side."""
        return SIZES[self.size] / 2


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ShapeObject, ...]

    def to_dict(self) -> dict:
        return {"background": self.background,
                "objects": [{"shape": o.shape, "color": o.color, "size": o.size, "x": o.x, "y": o.y}
                            for o in self.objects]}

    @classmethod
    def from_dict(cls, d) -> "Scene":
        if d.get("background") not in BACKGROUNDS:
            raise ValueError(f"Scene.from_dict: background={d.get('background')!r} is not one of "
                             f"{tuple(BACKGROUNDS)}")
        objects = []
        for i, o in enumerate(d.get("objects", ())):
            for field, names in (("shape", SHAPES), ("color", COLORS), ("size", SIZES)):
                if o.get(field) not in names:
                    raise ValueError(f"Scene.from_dict: objects[{i}].{field}={o.get(field)!r} is not one of "
                                     f"{tuple(names)}")
            for field in ("x", "y"):
                v = o.get(field)
                if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                    raise ValueError(f"Scene.from_dict: objects[{i}].{field}={v!r} must be a number in [0, 1]")
            objects.append(ShapeObject(o["shape"], o["color"], o["size"], float(o["x"]), float(o["y"])))
        return cls(d["background"], tuple(objects))


def is_held_out_scene(scene: Scene) -> bool:
    return any((o.color, o.shape) in HELD_OUT_PAIRS for o in scene.objects)


def _clear_relation(a: ShapeObject, b: ShapeObject) -> bool:
    return max(abs(a.x - b.x), abs(a.y - b.y)) >= RELATION_MARGIN


def relation(a: ShapeObject, b: ShapeObject) -> tuple[str, ...]:
    """The relations in RELATIONS that hold for `a` relative to `b` with at least RELATION_MARGIN to spare."""
    out = []
    if b.x - a.x >= RELATION_MARGIN:
        out.append("left of")
    if a.x - b.x >= RELATION_MARGIN:
        out.append("right of")
    if b.y - a.y >= RELATION_MARGIN:
        out.append("above")
    if a.y - b.y >= RELATION_MARGIN:
        out.append("below")
    return tuple(out)


def _place(rng: np.random.Generator, sizes: list[str], grid: int = 0,
           tries: int = 200) -> list[tuple[float, float]] | None:
    """Rejection-sample centres: inside the image, bounding circles GAP apart, and every pair of centres
    RELATION_MARGIN apart along some axis so that each pair has a relation a caption can state. grid > 0: centres
    only at the cell centres (k + 0.5) / grid of a grid x grid lattice (see random_scene)."""
    placed: list[tuple[float, float, float]] = []
    for size in sizes:
        r = SIZES[size] / 2
        lo, hi = r + EDGE_MARGIN, 1 - r - EDGE_MARGIN
        cells = [(k + 0.5) / grid for k in range(grid) if lo <= (k + 0.5) / grid <= hi] if grid else []
        for _ in range(tries):
            if grid:
                x, y = (cells[int(k)] for k in rng.integers(len(cells), size=2))
            else:
                x, y = rng.uniform(lo, hi, size=2)
            if all(np.hypot(x - px, y - py) >= r + pr + GAP
                   and max(abs(x - px), abs(y - py)) >= RELATION_MARGIN for px, py, pr in placed):
                placed.append((float(x), float(y), r))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def random_scene(rng: np.random.Generator, held_out: bool = False, grid: int = 0,
                 max_objects: int = MAX_OBJECTS) -> Scene:
    """1 to max_objects objects (fewer: a smaller world for curriculum experiments); `held_out=False` never uses a
    HELD_OUT_PAIRS pair, `held_out=True` always uses at least one.
    grid > 0 puts every centre on a cell centre of a grid x grid lattice instead of anywhere. With grid = the
    latent side (8 at 256 px for a 32x autoencoder) each object sits at the same phase of the latent grid, so an
    object has one latent pattern per position instead of a continuum: a smaller world for a small model."""
    if grid and grid < 4:
        raise ValueError(f"random_scene: grid={grid} must be 0 (anywhere) or >= 4 (four large objects need room)")
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"random_scene: max_objects={max_objects} must be in 1..{MAX_OBJECTS}")
    background = str(rng.choice(list(BACKGROUNDS)))
    colors = allowed_colors(background)
    n = int(rng.integers(1, max_objects + 1))

    def sample_pair() -> tuple[str, str]:
        while True:    # rejection; at most 3 of 48 pairs are held out, so this ends fast
            pair = (str(rng.choice(colors)), str(rng.choice(SHAPES)))
            if held_out or pair not in HELD_OUT_PAIRS:
                return pair

    if n > 1 and rng.random() < 0.35:
        # counting scenes ("three blue stars"): every object shares colour and shape, sizes may differ
        pairs = [sample_pair()] * n
    else:
        pairs = [sample_pair() for _ in range(n)]
    if held_out and not any(p in HELD_OUT_PAIRS for p in pairs):
        options = sorted(p for p in HELD_OUT_PAIRS if p[0] in colors)
        k = int(rng.integers(n))
        pairs = [options[int(rng.integers(len(options)))] if i == k or pairs[i] == pairs[k] else p
                 for i, p in enumerate(pairs)]
    shared_size = str(rng.choice(list(SIZES)))
    while True:
        if pairs[0] == pairs[-1] and n > 1 and rng.random() < 0.5:
            sizes = [shared_size] * n
        else:
            sizes = [str(s) for s in rng.choice(list(SIZES), size=n)]
        centres = _place(rng, sizes, grid)
        if centres is not None:
            break
        shared_size = "small"   # a layout failed (e.g. four large objects): retry, smaller when shared
    objects = tuple(ShapeObject(shape, color, size, x, y)
                    for (color, shape), size, (x, y) in zip(pairs, sizes, centres))
    return Scene(background, objects)


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------
# Every shape lies inside its bounding circle of radius R = SIZES[size] / 2 (so the geometry checks above are
# exact), with scales chosen so areas are comparable: circle r = 0.8 R (2.0 R^2), square inscribed (2.0 R^2),
# hexagon 0.9 R (2.1 R^2), cross inscribed with arm width 1/3 of its span (2.0 R^2), star with inner radius
# 0.5 R (1.5 R^2), upright equilateral triangle inscribed and centred on its centroid (1.3 R^2).

def _unit_polygon(shape: str) -> np.ndarray:
    """(K, 2) vertices for a bounding circle of radius 1 at the origin, y down."""
    if shape == "square":
        s = np.sqrt(0.5)
        return np.array([[-s, -s], [s, -s], [s, s], [-s, s]])
    if shape == "triangle":
        ang = np.radians([-90, 30, 150])
        return np.stack([np.cos(ang), np.sin(ang)], 1)
    if shape == "hexagon":
        ang = np.radians(np.arange(6) * 60)
        return 0.9 * np.stack([np.cos(ang), np.sin(ang)], 1)
    if shape == "star":
        ang = np.radians(-90 + np.arange(10) * 36)
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.5)
        return rad[:, None] * np.stack([np.cos(ang), np.sin(ang)], 1)
    if shape == "cross":
        arm = np.sqrt(1 / 10)            # half arm width a with a = L / 3 and a^2 + L^2 = 1
        length = 3 * arm
        return np.array([[-arm, -length], [arm, -length], [arm, -arm], [length, -arm], [length, arm],
                         [arm, arm], [arm, length], [-arm, length], [-arm, arm], [-length, arm],
                         [-length, -arm], [-arm, -arm]])
    raise ValueError(f"shape={shape!r} is not one of {SHAPES}")


_POLYGONS = {s: _unit_polygon(s) for s in SHAPES if s != "circle"}
CIRCLE_SCALE = 0.8


def render(scene: Scene, size: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB. Drawn at SUPERSAMPLE x with Pillow, then box-reduced: anti-aliased edges, and
    any pixel fully covered by one object keeps that object's exact colour."""
    if size < 32:
        raise ValueError(f"render: size={size} must be >= 32")
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, r = o.x * big, o.y * big, o.radius * big
        color = COLORS[o.color]
        if o.shape == "circle":
            rc = CIRCLE_SCALE * r
            # Pillow's ellipse box is inclusive of its far edge: shrink by half a pixel to stay centred
            draw.ellipse([cx - rc, cy - rc, cx + rc - 1, cy + rc - 1], fill=color)
        else:
            pts = _POLYGONS[o.shape] * r + (cx - 0.5, cy - 0.5)   # pixel centres sit at +0.5
            draw.polygon([tuple(p) for p in pts.tolist()], fill=color)
    return np.asarray(img.reduce(SUPERSAMPLE))


# ---------------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------------
# score = mentioned facts / total facts, where a scene of n objects has
#     3 n facts   shape, colour and size of each object (an object is mentioned when a noun phrase covers it)
#   + 1 fact      the count: every object is covered by some noun phrase
#   + 1 fact      the background is named
#   + 1 fact      (n >= 2 and some pair has a statable relation) at least one relation is stated
# A noun phrase with a given set of attributes always covers *all* objects that match it, with their number
# ("two blue stars" when there are exactly two), so every caption is true of the image. The complete caption
# (every object with size, colour and shape, the background and relations) scores 1.

_NUMBERS = ("zero", "one", "two", "three", "four")
_SHAPE_WORDS = {"circle": ("circle",), "square": ("square",), "triangle": ("triangle",),
                "star": ("star", "five-pointed star"), "hexagon": ("hexagon",), "cross": ("cross",)}
_SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium", "medium-sized"), "large": ("large",)}
_REL_WORDS = {"left of": ("to the left of", "left of"), "right of": ("to the right of", "right of"),
              "above": ("above",), "below": ("below", "under")}
_BG_WORDS = {"white": ("white",), "black": ("black",), "gray": ("gray", "grey"), "beige": ("beige",)}
_WRAPS = ("{body}", "{body} on a {bg} background", "a {bg} background with {body}", "{body}, {bg} background",
          "an image of {body}", "a picture of {body} on a {bg} background", "{body} against a {bg} background")

# Phrasings used only for held-out captions, so the evaluator can test unseen wording.
HELD_OUT_SHAPE_WORDS = {"circle": ("disc",), "cross": ("plus sign",)}
_HELD_OUT_SIZE_WORDS = {"large": ("big",)}
_HELD_OUT_REL_WORDS = {"below": ("beneath",)}
_HELD_OUT_WRAPS = ("a photo of {body}", "{body} set against a {bg} backdrop", "a {bg} backdrop behind {body}")


def _plural(word: str) -> str:
    head, _, tail = word.rpartition(" ")
    noun = tail + ("es" if tail.endswith(("s", "x")) else "s")
    return f"{head} {noun}" if head else noun


class _Phraser:
    """Picks words for one caption; the held-out flag widens the vocabulary."""

    def __init__(self, rng: np.random.Generator, held_out: bool):
        self.rng, self.held_out = rng, held_out

    def pick(self, table: dict, extra: dict, key: str) -> str:
        options = table[key] + (extra.get(key, ()) if self.held_out else ())
        return str(options[int(self.rng.integers(len(options)))])

    def noun_phrase(self, key: dict, count: int, article: str | None) -> str:
        """key holds 'shape' and optionally 'size', 'color'. article: 'a', 'the' or None (terse)."""
        words = []
        if "size" in key:
            words.append(self.pick(_SIZE_WORDS, _HELD_OUT_SIZE_WORDS, key["size"]))
        if "color" in key:
            words.append(key["color"])
        noun = self.pick(_SHAPE_WORDS, HELD_OUT_SHAPE_WORDS, key["shape"])
        words.append(noun if count == 1 else _plural(noun))
        if count > 1:
            words.insert(0, _NUMBERS[count])
        elif article == "a":
            words.insert(0, "an" if words[0][0] in "aeiou" else "a")
        elif article == "the":
            words.insert(0, "the")
        return " ".join(words)

    def relation_phrase(self, rel: str) -> str:
        return self.pick(_REL_WORDS, _HELD_OUT_REL_WORDS, rel)

    def wrap(self, body: str, background: str | None) -> str:
        wraps = _WRAPS + (_HELD_OUT_WRAPS if self.held_out else ())
        wraps = [w for w in wraps if ("{bg}" in w) == (background is not None)]
        w = wraps[int(self.rng.integers(len(wraps)))]
        bg = self.pick(_BG_WORDS, {}, background) if background is not None else ""
        return w.format(body=body, bg=bg)


def _groups(scene: Scene, attrs: tuple[str, ...]) -> list[tuple[dict, list[int]]]:
    """Objects grouped by the values of `attrs`, in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, o in enumerate(scene.objects):
        groups.setdefault(tuple(getattr(o, a) for a in attrs), []).append(i)
    return [(dict(zip(attrs, k)), idx) for k, idx in groups.items()]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _statable_pairs(scene: Scene, attrs: tuple[str, ...]) -> list[tuple[int, int, str]]:
    """(i, j, relation) with i, j each unique under `attrs` (so 'the red circle' names one object)."""
    unique = [idx[0] for _, idx in _groups(scene, attrs) if len(idx) == 1]
    out = []
    for a in unique:
        for b in unique:
            if a != b:
                out.extend((a, b, r) for r in relation(scene.objects[a], scene.objects[b]))
    return out


def _score(scene: Scene, covered: dict[int, set[str]], background: bool, relations: int) -> float:
    n = len(scene.objects)
    has_rel = n >= 2 and bool(_statable_pairs(scene, ("size", "color", "shape")))
    total = 3 * n + 2 + int(has_rel)
    got = sum(len(a) for a in covered.values()) + int(len(covered) == n) + int(background)
    got += int(has_rel and relations > 0)
    return got / total


def captions(scene: Scene, rng: np.random.Generator, held_out: bool = False) -> list[tuple[str, float]]:
    """4-6 distinct (caption, score) pairs, the complete caption first. Scores follow the formula above."""
    if not scene.objects:
        raise ValueError("captions: scene.objects is empty")
    ph = _Phraser(rng, held_out)
    n = len(scene.objects)
    full = ("size", "color", "shape")

    def describe(attrs, which: list[int] | None, article, rel_count: int, with_bg: bool, prefix: str = "",
                 wrap: bool = True):
        groups = _groups(scene, attrs)
        chosen = groups if which is None else [groups[k] for k in which]
        parts = [ph.noun_phrase(key, len(idx), article) for key, idx in chosen]
        covered = {i: set(attrs) for _, idx in chosen for i in idx}
        body = prefix + _join(parts)
        rels = _statable_pairs(scene, attrs)
        stated = []
        used: set[frozenset] = set()
        for k in rng.permutation(len(rels)):
            a, b, r = rels[int(k)]
            if len(stated) < rel_count and frozenset((a, b)) not in used:   # one relation per pair
                used.add(frozenset((a, b)))
                stated.append(f"{ph.noun_phrase(_key(a, attrs), 1, 'the')} is {ph.relation_phrase(r)} "
                              f"{ph.noun_phrase(_key(b, attrs), 1, 'the')}")
                covered.setdefault(a, set()).update(attrs)
                covered.setdefault(b, set()).update(attrs)
        text = ph.wrap(body, scene.background if with_bg else None) if wrap else body
        if stated:
            text += "; " + ", and ".join(stated)
        return text, _score(scene, covered, with_bg, len(stated))

    def _key(i: int, attrs) -> dict:
        return {a: getattr(scene.objects[i], a) for a in attrs}

    out = [describe(full, None, "a", max(n - 1, 0), True)]            # complete
    kinds = ["terse", "list", "list", "count", "relation", "partial"]
    for k in rng.permutation(len(kinds)):
        kind = kinds[int(k)]
        with_bg = bool(rng.random() < 0.5)
        if kind == "terse":
            attrs = ("color", "shape")
            m = len(_groups(scene, attrs))
            cap = describe(attrs, sorted(rng.permutation(m)[:int(rng.integers(1, m + 1))].tolist()), None, 0, False,
                           wrap=False)
        elif kind == "list":
            attrs = (("color", "shape"), full, ("shape",))[int(rng.integers(3))]
            cap = describe(attrs, None, "a", 0, with_bg)
        elif kind == "count":
            mixed = n > 1 and len(_groups(scene, ("shape",))) > 1
            cap = describe(("shape",), None, "a", 0, with_bg, f"{_NUMBERS[n]} shapes: " if mixed else "")
        elif kind == "relation":
            attrs = (("color", "shape"), full)[int(rng.integers(2))]
            if n < 2 or not _statable_pairs(scene, attrs):
                continue
            a, b, r = _statable_pairs(scene, attrs)[int(rng.integers(len(_statable_pairs(scene, attrs))))]
            text = (f"{ph.noun_phrase(_key(a, attrs), 1, 'a')} {ph.relation_phrase(r)} "
                    f"{ph.noun_phrase(_key(b, attrs), 1, 'a')}")
            covered = {a: set(attrs), b: set(attrs)}
            cap = (ph.wrap(text, scene.background if with_bg else None),
                   _score(scene, covered, with_bg, 1))
        else:   # partial: a random subset of the colour+shape groups, with sizes
            groups = _groups(scene, full)
            keep = sorted(rng.permutation(len(groups))[:max(1, len(groups) - 1)].tolist())
            cap = describe(full, keep, "a", 0, with_bg)
        if cap[0] not in [c for c, _ in out]:
            out.append(cap)
        if len(out) >= 4 + int(rng.integers(3)) or len(out) >= 6:
            break
    return out


def sample(index: int, size: int, seed: int = 0, held_out: bool = False, grid: int = 0,
           max_objects: int = MAX_OBJECTS) -> tuple[np.ndarray, dict]:
    """Sample `index` of the data set drawn with `seed`: (image (size, size, 3) uint8, meta). Each sample has its own
    generator seeded by (seed, index, held_out), so any sample can be made alone, in any order, by any worker.
    grid, max_objects: see random_scene."""
    rng = np.random.default_rng([seed, index, int(held_out)])
    scene = random_scene(rng, held_out=held_out, grid=grid, max_objects=max_objects)
    caps = captions(scene, rng, held_out=held_out)
    return render(scene, size), {"captions": [{"text": t, "score": s} for t, s in caps], "scene": scene.to_dict()}


def samples(num: int, size: int, seed: int = 0, held_out: bool = False, start: int = 0, grid: int = 0,
            max_objects: int = MAX_OBJECTS):
    """Samples start .. start + num - 1 (see `sample`)."""
    if num < 1 or size < 32 or grid < 0 or not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"num={num} must be >= 1, size={size} >= 32, grid={grid} >= 0 and "
                         f"max_objects={max_objects} in 1..{MAX_OBJECTS}")
    return (sample(i, size, seed, held_out, grid, max_objects) for i in range(start, start + num))
