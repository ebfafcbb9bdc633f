"""The shapes data set and the GenEval-style evaluator: throughput, detector accuracy, caption consistency.

1. Throughput (images/s, single process): `shapes.sample` (scene + captions + render) and `shapes.render`
   alone; `data.write_wds` / `data.write_folder` of pre-rendered samples to a temporary folder (PNG encoding
   included) and `read_wds` / `read_folder` of the result (PNG decoding included); `geneval.detect` and
   `geneval.evaluate` (detect + check + thumbnail) on renders of evaluation prompts. Each figure is the median
   of --repeats runs over the same inputs after a warm-up of one item (detect and evaluate in alternating
   order within each round, as their difference is small), per wall-clock second and per CPU second of this
   process: on a shared machine the wall figure drops with other processes' load, the CPU figure much less.
2. Detector accuracy per GenEval category, at each resolution, on renders of `geneval.scene_for` scenes of the
   training and held-out prompt sets (several random scenes per prompt): pass rate on clean renders of the
   prompt's own scene; false-pass rate on a render of a different prompt of the same category whose scene does
   not meet the prompt (decided on the scene, not by the detector); false-pass rate on a "near miss", a scene
   of the prompt changed in one fact (another shape, count +- 1, another colour, colours swapped, the opposite
   relation); pass rate after Gaussian blur, additive Gaussian noise and JPEG of the clean render. Every cell
   gives its number of images.
3. Caption consistency: for `shapes.sample` images (training and held-out), whether `detect` sees the scene
   stored in the sample's JSON, which every caption is generated from: the same number of objects and, matched
   one to one by position, the same shape, colour and size (from the detected area against the shape's nominal
   area), the centroid within --pos-tol of the drawn centre, and every relation a caption may state (centres
   >= shapes.RELATION_MARGIN apart on an axis) with the same sign between the detected centroids.

    python benchmarks/shapes_eval.py                     # full run (a few minutes on 2 cores)
    python benchmarks/shapes_eval.py --quick             # smoke run, small counts
    python benchmarks/shapes_eval.py --out shapes_eval.md
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from sanaflow import data, shapes
from sanaflow import geneval as g
from sanaflow.files import atomic_write

DISTORTIONS = ("blur", "noise", "jpeg")


# ################################################################################################################
# Throughput
# ################################################################################################################

Rate = tuple[float, float]         # (images per wall-clock second, images per CPU second of this process)


def _timed(fn: Callable[[], int]) -> tuple[int, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    n = fn()
    return n, time.perf_counter() - wall, time.process_time() - cpu


def images_per_second(fn: Callable[[], int], repeats: int) -> Rate:
    """fn() processes a batch and returns its size; images per wall second and per CPU second of this process,
    each from the median of `repeats` calls. On a shared machine the CPU figure is the steadier one."""
    return paired_images_per_second({"": fn}, repeats)[""]


def paired_images_per_second(fns: dict[str, Callable[[], int]], repeats: int) -> dict[str, Rate]:
    """As `images_per_second` for several candidates run in the same rounds, alternating which goes first, so
    that drift of the machine's speed hits all of them alike (detect and evaluate, whose difference is small)."""
    runs: dict[str, list[tuple[int, float, float]]] = {k: [] for k in fns}
    items = list(fns.items())
    for r in range(repeats):
        for name, fn in items if r % 2 == 0 else items[::-1]:
            runs[name].append(_timed(fn))
    return {k: (v[0][0] / statistics.median(w for _, w, _ in v), v[0][0] / statistics.median(c for _, _, c in v))
            for k, v in runs.items()}


def _throughput_at(size: int, n: int, repeats: int, seed: int, tmp: Path, eval_prompts: list[g.EvalPrompt],
                   eval_scenes: list[shapes.Scene]) -> dict[str, Rate]:
    rows: dict[str, Rate] = {}
    shapes.sample(0, size, seed)                                            # warm-up
    rows["shapes.sample (scene + captions + render)"] = images_per_second(
        lambda: sum(1 for _ in shapes.samples(n, size, seed)), repeats)
    items = list(shapes.samples(n, size, seed))
    scenes = [shapes.Scene.from_dict(m["scene"]) for _, m in items]
    rows["shapes.render"] = images_per_second(lambda: len([shapes.render(s, size) for s in scenes]), repeats)

    dirs: dict[str, Path] = {}

    def write(kind: str) -> int:
        out = Path(tempfile.mkdtemp(dir=tmp, prefix=f"{kind}{size}_"))      # a fresh folder for every run
        dirs[kind] = out
        if kind == "wds":
            data.write_wds(items, out, shard_size=100)
            return len(items)
        return data.write_folder(items, out)

    def read(kind: str) -> int:
        reader = data.read_wds(dirs[kind]) if kind == "wds" else data.read_folder(dirs[kind])
        got = sum(1 for _ in reader)
        if got != len(items) or reader.skipped:
            raise RuntimeError(f"read {kind}: {got} of {len(items)} samples, skipped {dict(reader.skipped)}")
        return got

    data.write_wds(items[:1], tmp / f"warm{size}", shard_size=100)
    rows["data.write_wds (PNG + tar shards of 100)"] = images_per_second(lambda: write("wds"), repeats)
    rows["data.write_folder (PNG + JSON files)"] = images_per_second(lambda: write("folder"), repeats)
    rows["data.read_wds (PNG decode)"] = images_per_second(lambda: read("wds"), repeats)
    rows["data.read_folder (PNG decode)"] = images_per_second(lambda: read("folder"), repeats)

    images = [shapes.render(s, size) for s in eval_scenes]
    g.detect(images[0])
    pairs = [(p, [im]) for p, im in zip(eval_prompts, images)]
    rows |= paired_images_per_second({
        "geneval.detect": lambda: len([g.detect(im) for im in images]),
        "geneval.evaluate (detect + check + thumbnail)": lambda: len(g.evaluate(pairs).results)}, repeats)
    return rows


def throughput(sizes: list[int], n: int, repeats: int, seed: int) -> list[str]:
    """Shapes data and detection use the same images at each size; detection runs on renders of evaluation
    prompts' scenes (what `sanaflow eval` judges), data on `shapes.sample` images."""
    rng = np.random.default_rng(seed)
    prompts = g.prompt_set(False, seed=seed) + g.prompt_set(True, seed=seed)
    eval_prompts = [prompts[i] for i in rng.integers(len(prompts), size=n)]
    eval_scenes = [g.scene_for(p, rng) for p in eval_prompts]
    with tempfile.TemporaryDirectory(prefix="shapes_eval_") as tmp:
        by_size = {size: _throughput_at(size, n, repeats, seed, Path(tmp), eval_prompts, eval_scenes)
                   for size in sizes}
    head = " | ".join(f"{s} px img/s | {s} px img/CPU-s" for s in sizes)
    out = [f"| stage | {head} |", "|---|" + "---:|" * 2 * len(sizes)]
    for name in by_size[sizes[0]]:
        out.append(f"| {name} | " + " | ".join(f"{by_size[s][name][0]:.0f} | {by_size[s][name][1]:.0f}" for s in sizes)
                   + " |")
    return out


# ################################################################################################################
# Detector accuracy
# ################################################################################################################

def distort(kind: str, image: np.ndarray, rng: np.random.Generator, args) -> np.ndarray:
    if kind == "blur":
        return cv2.GaussianBlur(image, (0, 0), args.blur_sigma)
    if kind == "noise":
        return np.clip(image + rng.normal(0, args.noise_std, image.shape), 0, 255).astype(np.uint8)
    if kind == "jpeg":
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]),
                               [cv2.IMWRITE_JPEG_QUALITY, args.jpeg_quality])
        if not ok:
            raise RuntimeError("cv2.imencode failed")
        return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])
    raise ValueError(f"distort: kind={kind!r} is not one of {DISTORTIONS}")


def eval_scenes(per_category: int, seed: int) -> list[tuple[g.EvalPrompt, shapes.Scene, str]]:
    """(prompt, scene, split): per category, half the renders from the training prompt set and half from the
    held-out one, the split's prompts in turn with a fresh random scene for every render."""
    out = []
    for split, held_out in (("train", False), ("held-out", True)):
        rng = np.random.default_rng([seed, int(held_out)])
        by_cat = defaultdict(list)
        for p in g.prompt_set(held_out, seed=seed):
            by_cat[p.category].append(p)
        n = per_category // 2 if held_out else per_category - per_category // 2
        for cat in g.CATEGORIES:
            for i in range(n):
                p = by_cat[cat][i % len(by_cat[cat])]
                out.append((p, g.scene_for(p, rng), split))
    return out


OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def near_miss(prompt: g.EvalPrompt, rng: np.random.Generator) -> g.EvalPrompt:
    """A prompt of the same category that differs in one fact, the hardest negative for the detector: another
    shape (single_object, two_objects' second object), count +- 1, another colour, the two colours swapped
    (color_attr), the opposite relation (position). Its text is not used."""
    req, items = prompt.requirement, prompt.requirement.items

    def other(options, *not_these):
        options = [o for o in options if o not in not_these]
        return options[rng.integers(len(options))]

    cat = prompt.category
    if cat == "single_object":
        items = (dataclasses.replace(items[0], shape=other(shapes.SHAPES, items[0].shape)),)
    elif cat == "two_objects":
        items = (items[0], dataclasses.replace(items[1], shape=other(shapes.SHAPES, items[0].shape, items[1].shape)))
    elif cat == "counting":
        n = items[0].count
        items = (dataclasses.replace(items[0], count=other([c for c in (n - 1, n + 1) if 1 <= c <= 4])),)
    elif cat == "colors":
        items = (dataclasses.replace(items[0], color=other(list(shapes.COLORS), items[0].color)),)
    elif cat == "color_attr":
        a, b = items
        items = (dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color))
    elif cat == "position":
        req = dataclasses.replace(req, relation=OPPOSITE[req.relation])
    return g.EvalPrompt(cat, f"near miss of {prompt.text!r}", dataclasses.replace(req, items=items))


def accuracy(items: list[tuple[g.EvalPrompt, shapes.Scene, str]], size: int, args) -> list[str]:
    rng = np.random.default_rng([args.seed, size])
    images = [shapes.render(s, size) for _, s, _ in items]
    dets = [g.detect(im) for im in images]
    by_cat = defaultdict(list)
    for k, (p, _, _) in enumerate(items):
        by_cat[p.category].append(k)
    results: dict[str, list[tuple[str, str, bool]]] = defaultdict(list)    # column -> (category, split, passed)
    for k, (p, scene, split) in enumerate(items):
        results["clean"].append((p.category, split, g.check(p, dets[k])))
        others = [j for j in by_cat[p.category] if items[j][0] != p and not g.satisfies(p, items[j][1])]
        if others:
            j = others[rng.integers(len(others))]
            results["negative"].append((p.category, split, g.check(p, dets[j])))
        miss = g.scene_for(near_miss(p, rng), rng)
        if not g.satisfies(p, miss):                                # always, by construction; kept honest
            results["near miss"].append((p.category, split, g.check(p, g.detect(shapes.render(miss, size)))))
        for kind in DISTORTIONS:
            results[kind].append((p.category, split, g.check(p, g.detect(distort(kind, images[k], rng, args)))))

    def cell(col: str, keep: Callable[[str, str], bool]) -> str:
        v = [ok for cat, split, ok in results[col] if keep(cat, split)]
        return f"{100 * np.mean(v):.1f} % ({len(v)})" if v else "-"

    cols = ("clean", "negative", "near miss", *DISTORTIONS)
    header = ("| category | clean pass | negative control: false pass | near miss: false pass | "
              f"blur σ={args.blur_sigma:g} px pass | noise σ={args.noise_std:g}/255 pass | "
              f"JPEG q{args.jpeg_quality} pass |")
    out = [header, "|---|" + "---:|" * len(cols)]
    for cat in g.CATEGORIES:
        out.append(f"| {cat} | " + " | ".join(cell(c, lambda c_, s_, cat=cat: c_ == cat) for c in cols) + " |")
    for split in ("train", "held-out"):
        out.append(f"| all, {split} prompts | "
                   + " | ".join(cell(c, lambda c_, s_, split=split: s_ == split) for c in cols) + " |")
    out.append("| **overall** | " + " | ".join(f"**{cell(c, lambda c_, s_: True)}**" for c in cols) + " |")
    return out


# ################################################################################################################
# Caption consistency
# ################################################################################################################

def _polygon_area(p: np.ndarray) -> float:
    return 0.5 * abs(float(np.dot(p[:, 0], np.roll(p[:, 1], 1)) - np.dot(p[:, 1], np.roll(p[:, 0], 1))))


# Area of each shape for a bounding circle of radius 1 (see the rendering notes in sanaflow/shapes.py).
UNIT_AREA = {s: math.pi * shapes.CIRCLE_SCALE ** 2 if s == "circle" else _polygon_area(shapes._unit_polygon(s))
             for s in shapes.SHAPES}


def size_from_area(shape: str, area: float) -> str:
    """The size whose nominal area for `shape` is nearest to `area` (both fractions of the image) in log
    scale; nominal areas of neighbouring sizes differ by 2x, the detector's areas are within 12 % of nominal."""
    return min(shapes.SIZES, key=lambda z: abs(math.log(area / (UNIT_AREA[shape] * (shapes.SIZES[z] / 2) ** 2))))


def compare(scene: shapes.Scene, dets: list[g.Detection], pos_tol: float) -> dict[str, bool]:
    """Which facts of `scene` the detections confirm; the objects are matched one to one by the permutation
    with the least total centre distance (at most 4! = 24 to try)."""
    objs = scene.objects
    res = {"count": len(dets) == len(objs)}
    if not res["count"]:
        return res | {k: False for k in ("shape", "colour", "size", "position", "relations")}
    perm = min(itertools.permutations(range(len(dets))),
               key=lambda pm: sum(math.hypot(o.x - dets[j].x, o.y - dets[j].y) for o, j in zip(objs, pm)))
    ds = [dets[j] for j in perm]
    res["shape"] = all(o.shape == d.shape for o, d in zip(objs, ds))
    res["colour"] = all(o.color == d.color for o, d in zip(objs, ds))
    res["size"] = all(o.size == size_from_area(d.shape, d.area) for o, d in zip(objs, ds))
    res["position"] = all(max(abs(o.x - d.x), abs(o.y - d.y)) <= pos_tol for o, d in zip(objs, ds))
    ok = True
    for (a, da), (b, db) in itertools.combinations(zip(objs, ds), 2):
        for true_off, det_off in ((b.x - a.x, db.x - da.x), (b.y - a.y, db.y - da.y)):
            if abs(true_off) >= shapes.RELATION_MARGIN and np.sign(true_off) != np.sign(det_off):
                ok = False
    res["relations"] = ok
    return res


def caption_consistency(n: int, sizes: list[int], args) -> list[str]:
    keys = ("count", "shape", "colour", "size", "position", "relations")
    out = ["| resolution | split | images | objects | " + " | ".join(keys) + " | all agree |",
           "|---|---|---:|---:|" + "---:|" * (len(keys) + 1)]
    for size in sizes:
        for split, held_out in (("train", False), ("held-out", True)):
            res, n_obj = [], 0
            for image, meta in shapes.samples(n // 2, size, args.seed, held_out):
                scene = shapes.Scene.from_dict(meta["scene"])
                n_obj += len(scene.objects)
                res.append(compare(scene, g.detect(image), args.pos_tol))
            rates = [f"{100 * np.mean([r[k] for r in res]):.1f} %" for k in keys]
            every = f"{100 * np.mean([all(r.values()) for r in res]):.1f} %"
            out.append(f"| {size} px | {split} | {len(res)} | {n_obj} | " + " | ".join(rates) + f" | {every} |")
    return out


# ################################################################################################################

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts for a smoke run (unless given below)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 128])
    ap.add_argument("--per-category", type=int, default=None, help="accuracy renders per category and resolution, "
                    "half from training and half from held-out prompts (default 100, --quick 10)")
    ap.add_argument("--captions", type=int, default=None,
                    help="caption-consistency samples per resolution, half of them held-out (default 400, --quick 40)")
    ap.add_argument("--speed-n", type=int, default=None, help="images per throughput run (default 200, --quick 20)")
    ap.add_argument("--repeats", type=int, default=None, help="throughput runs (default 3, --quick 1)")
    ap.add_argument("--blur-sigma", type=float, default=1.0, help="Gaussian blur sigma in pixels")
    ap.add_argument("--noise-std", type=float, default=8.0, help="additive Gaussian noise std, in 0..255 units")
    ap.add_argument("--jpeg-quality", type=int, default=75)
    ap.add_argument("--pos-tol", type=float, default=0.02, help="centroid tolerance, fraction of the side")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown to this file")
    args = ap.parse_args()
    for name, full, quick, least in (("per_category", 100, 10, 2), ("captions", 400, 40, 2), ("speed_n", 200, 20, 1),
                                     ("repeats", 3, 1, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
        if getattr(args, name) < least:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= {least}")
    if min(args.sizes) < 32:
        ap.error(f"--sizes {args.sizes}: every size must be >= 32 (shapes.render's minimum)")

    start = time.perf_counter()
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
               f"numpy {np.__version__}, OpenCV {cv2.__version__}; seed {args.seed}; "
               f"1-minute load average at start {os.getloadavg()[0]:.1f} (other processes share the cores)")
    lines = [machine, ""]

    def emit(new: list[str]) -> None:
        lines.extend(new)
        print("\n".join(new), flush=True)

    print("\n".join(lines))
    emit([f"### Throughput ({args.speed_n} images, median of {args.repeats} runs)", ""]
         + throughput(args.sizes, args.speed_n, args.repeats, args.seed) + [""])
    items = eval_scenes(args.per_category, args.seed)
    for size in args.sizes:
        title = (f"### Detector accuracy at {size} px ({len(items)} renders of {len({p for p, _, _ in items})} "
                 "prompts; pass rate, images in parentheses)")
        emit([title, ""] + accuracy(items, size, args) + [""])
    title = f"### Caption consistency: detect() against the sample's stored scene (position tolerance {args.pos_tol:g})"
    emit([title, ""] + caption_consistency(args.captions, args.sizes, args) + [""])
    emit([f"total time {time.perf_counter() - start:.0f} s; 1-minute load average at end {os.getloadavg()[0]:.1f}"])
    if args.out is not None:
        atomic_write(args.out, lambda p: p.write_text("\n".join(lines) + "\n"))   # never a half-written table
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
