"""The GenEval-style evaluator against the renderer it judges: clean renders of a prompt must pass, renders of a
different prompt must fail, and mild blur, noise and JPEG must not change the verdicts much.

The rates are measured on hundreds of renders, not a handful: 300 of training prompts and 120 of held-out prompts
(a fresh random scene per render, so prompts of small categories get several), clean at 256 and 128 px, against a
render of another prompt and a near miss (one fact changed), and 210 per degradation. The full tables, with
per-category counts, are printed by benchmarks/shapes_eval.py."""
from __future__ import annotations

import dataclasses
import json
from collections import defaultdict

import cv2
import numpy as np
import pytest
import torch

from sanaflow import geneval as g
from sanaflow import shapes

SIZE = 256
PER_CATEGORY = 50


def _renders(held_out: bool, per_category: int,
             seed: int) -> list[tuple[g.EvalPrompt, shapes.Scene, np.ndarray, list[g.Detection]]]:
    """per_category renders per category: the category's prompts in turn, a fresh scene for each render (counting
    has 18 prompts, so some get several scenes). Each with its detections, which several tests use."""
    rng = np.random.default_rng(seed)
    by_cat = defaultdict(list)
    for p in g.prompt_set(held_out, seed=seed, per_category=per_category):
        by_cat[p.category].append(p)
    out = []
    for cat in g.CATEGORIES:
        for i in range(per_category):
            p = by_cat[cat][i % len(by_cat[cat])]
            scene = g.scene_for(p, rng)
            image = shapes.render(scene, SIZE)
            out.append((p, scene, image, g.detect(image)))
    return out


@pytest.fixture(scope="module")
def clean():
    return _renders(held_out=False, per_category=PER_CATEGORY, seed=0)


@pytest.fixture(scope="module")
def held():
    return _renders(held_out=True, per_category=20, seed=1)


def _rates(results: list[tuple[str, bool]]) -> dict[str, float]:
    cats = defaultdict(list)
    for cat, ok in results:
        cats[cat].append(ok)
    return {c: float(np.mean(v)) for c, v in cats.items()}


def test_clean_renders_pass(clean):
    results = [(p.category, g.check(p, dets)) for p, _, _, dets in clean]
    overall = np.mean([ok for _, ok in results])
    assert overall >= 0.99, _rates(results)
    # a category the detector cannot read at all would hide under the overall rate
    assert min(_rates(results).values()) >= 0.95, _rates(results)


def test_clean_held_out_renders_pass(held):
    results = [(p.category, g.check(p, dets)) for p, _, _, dets in held]
    assert np.mean([ok for _, ok in results]) >= 0.99, _rates(results)


def test_renders_of_another_prompt_fail(clean, held):
    """Negative control: each prompt against a render of a different prompt of its category whose scene does
    not meet it (decided on the scene itself, not by the detector)."""
    rng = np.random.default_rng(2)
    by_cat = defaultdict(list)
    for p, scene, _, dets in clean + held:
        by_cat[p.category].append((p, scene, dets))
    results = []
    for p, _, _, _ in clean + held:
        others = [dets for q, s, dets in by_cat[p.category] if q != p and not g.satisfies(p, s)]
        assert others, p.text
        results.append((p.category, g.check(p, others[rng.integers(len(others))])))
    assert np.mean([ok for _, ok in results]) <= 0.01, _rates(results)


def _blur(im, rng):
    return cv2.GaussianBlur(im, (0, 0), 1.0)


def _noise(im, rng):
    return np.clip(im + rng.normal(0, 8, im.shape), 0, 255).astype(np.uint8)


def _jpeg(im, rng):
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(im[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 75])
    assert ok
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


@pytest.mark.parametrize("distort", [_blur, _noise, _jpeg], ids=["blur1px", "noise8", "jpeg75"])
def test_mild_degradations_keep_verdicts(clean, held, distort):
    rng = np.random.default_rng(3)
    # every other render keeps the test fast; that is 35 per category, 210 in all
    results = [(p.category, g.check(p, g.detect(distort(im, rng)))) for p, _, im, _ in clean[::2] + held[::2]]
    assert np.mean([ok for _, ok in results]) >= 0.90, _rates(results)
    assert min(_rates(results).values()) >= 0.80, _rates(results)


OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _near_miss(p: g.EvalPrompt, rng: np.random.Generator) -> g.EvalPrompt:
    """The prompt with one fact changed: another shape, count +- 1, another colour, the colours swapped, the
    opposite relation. Its scenes look like the prompt's in everything else: the hardest negatives."""
    req, items = p.requirement, p.requirement.items

    def other(options, *not_these):
        options = [o for o in options if o not in not_these]
        return options[rng.integers(len(options))]

    if p.category == "single_object":
        items = (dataclasses.replace(items[0], shape=other(shapes.SHAPES, items[0].shape)),)
    elif p.category == "two_objects":
        items = (items[0], dataclasses.replace(items[1], shape=other(shapes.SHAPES, items[0].shape, items[1].shape)))
    elif p.category == "counting":
        n = items[0].count
        items = (dataclasses.replace(items[0], count=other([c for c in (n - 1, n + 1) if 1 <= c <= 4])),)
    elif p.category == "colors":
        items = (dataclasses.replace(items[0], color=other(list(shapes.COLORS), items[0].color)),)
    elif p.category == "color_attr":
        a, b = items
        items = (dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color))
    else:
        req = dataclasses.replace(req, relation=OPPOSITE[req.relation])
    return g.EvalPrompt(p.category, "near miss", dataclasses.replace(req, items=items))


def test_128px_clean_renders_pass_and_near_misses_fail(clean, held):
    """At 128 px, where a small object is 18 px across: every scene again, and a scene of the same prompt with one
    fact changed (decided on the scene: `satisfies` is False) must fail."""
    rng = np.random.default_rng(7)
    passes, misses = [], []
    for p, scene, _, _ in clean + held:
        passes.append((p.category, g.check(p, g.detect(shapes.render(scene, 128)))))
        miss = g.scene_for(_near_miss(p, rng), rng)
        assert not g.satisfies(p, miss), (p.text, miss)
        misses.append((p.category, g.check(p, g.detect(shapes.render(miss, 128)))))
    assert np.mean([ok for _, ok in passes]) >= 0.99, _rates(passes)
    assert np.mean([ok for _, ok in misses]) <= 0.01, _rates(misses)


def test_detect_every_shape_colour_background_and_size():
    rng = np.random.default_rng(4)
    wrong = []
    for bg in shapes.BACKGROUNDS:
        for color in shapes.allowed_colors(bg):
            for shape in shapes.SHAPES:
                for size in shapes.SIZES:
                    obj = shapes.ShapeObject(shape, color, size, *rng.uniform(0.3, 0.7, 2))
                    dets = g.detect(shapes.render(shapes.Scene(bg, (obj,)), SIZE))
                    got = [(d.shape, d.color) for d in dets]
                    if got != [(shape, color)]:
                        wrong.append((bg, color, shape, size, got))
                    elif abs(dets[0].x - obj.x) > 0.02 or abs(dets[0].y - obj.y) > 0.02:
                        # the centroid of a triangle is its drawn centre; 0.02 = 5 px of anti-aliasing slack
                        wrong.append((bg, color, shape, size, "centre", dets[0].x, dets[0].y, obj.x, obj.y))
    assert not wrong, wrong[:10]


def test_detect_background_only_and_bad_input():
    for bg in shapes.BACKGROUNDS:
        assert g.detect(shapes.render(shapes.Scene(bg, ()), SIZE)) == []
    with pytest.raises(ValueError, match="image"):
        g.detect(np.zeros((8, 8), np.uint8))


def _det(shape, color, x, y, r=0.05):
    return g.Detection(shape, color, x, y, 3.14 * r * r, (x - r, y - r, x + r, y + r))


def test_check_rules():
    two = g.EvalPrompt("counting", "two stars", g.Requirement((g.Item("star", None, 2),), exact=True))
    assert g.check(two, [_det("star", "red", .2, .2), _det("star", "blue", .7, .7)])
    assert not g.check(two, [_det("star", "red", .2, .2)])
    assert not g.check(two, [_det("star", "red", .2, .2), _det("star", "red", .5, .5), _det("star", "red", .8, .8)])
    attr = g.EvalPrompt("color_attr", "a red star and a blue cross",
                        g.Requirement((g.Item("star", "red"), g.Item("cross", "blue"))))
    assert g.check(attr, [_det("star", "red", .2, .2), _det("cross", "blue", .7, .7)])
    assert not g.check(attr, [_det("star", "blue", .2, .2), _det("cross", "red", .7, .7)])
    left = g.EvalPrompt("position", "a red star to the left of a blue cross",
                        g.Requirement((g.Item("star", "red"), g.Item("cross", "blue")), relation="left of"))
    assert g.check(left, [_det("star", "red", .2, .5), _det("cross", "blue", .7, .5)])
    assert not g.check(left, [_det("star", "red", .7, .5), _det("cross", "blue", .2, .5)])
    # GenEval's margin: centres 0.015 apart with boxes 0.1 wide shrink to no offset at all -> no relation
    assert not g.check(left, [_det("star", "red", .5, .5), _det("cross", "blue", .515, .5)])
    # mostly vertical offset: "below", not "left of"
    assert g.relative_position(_det("star", "red", .45, .8), _det("cross", "blue", .5, .2)) == {"below"}


def test_prompt_sets_are_deterministic_and_split():
    a, b = g.prompt_set(False, seed=0), g.prompt_set(False, seed=0)
    assert a == b and a != g.prompt_set(False, seed=1)
    assert {p.category for p in a} == set(g.CATEGORIES)
    held = g.prompt_set(True, seed=0)
    assert not {p.text for p in held} & {p.text for p in a}
    for prompts, want in ((a, False), (held, True)):
        for p in prompts:
            pairs = {(i.color, i.shape) for i in p.requirement.items if i.color}
            if p.category == "single_object":          # names a colour that it does not score
                pairs = {tuple(p.text.split()[-2:])}
            if pairs:
                assert bool(pairs & shapes.HELD_OUT_PAIRS) == want, p
            elif want and g.HELD_OUT_SHAPE_WORDS:
                assert any(w in p.text for w in g.HELD_OUT_SHAPE_WORDS.values()), p
    # every held-out pair is asked for by itself in colors
    assert {(i.color, i.shape) for p in held if p.category == "colors" for i in p.requirement.items} \
        == set(shapes.HELD_OUT_PAIRS)


def test_prompts_round_trip_through_json_lines(tmp_path):
    prompts = g.prompt_set(True, seed=3, per_category=5)
    g.save_prompts(tmp_path / "p.jsonl", prompts)
    assert g.load_prompts(tmp_path / "p.jsonl") == prompts
    (tmp_path / "bad.jsonl").write_text('{"category": "nope", "text": "x", "requirement": {"items": []}}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        g.load_prompts(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("grid", [0, 8])
def test_scene_for_meets_the_prompt_exactly(grid):
    rng = np.random.default_rng(5)
    for p in g.prompt_set(False, seed=0, per_category=10) + g.prompt_set(True, seed=0, per_category=10):
        scene = g.scene_for(p, rng, grid=grid)
        assert g.satisfies(p, scene)
        assert len(scene.objects) == sum(i.count for i in p.requirement.items)
        assert all(o.color in shapes.allowed_colors(scene.background) for o in scene.objects)
        on_grid = all(abs(v * 8 - 0.5 - round(v * 8 - 0.5)) < 1e-9 for o in scene.objects for v in (o.x, o.y))
        assert on_grid or not grid, scene


def test_items_found_gives_partial_credit():
    two = g.EvalPrompt("counting", "two stars", g.Requirement((g.Item("star", None, 2),), exact=True))
    assert g.items_found(two, [_det("star", "red", .2, .2)]) == (0, 0)
    assert g.items_found(two, [_det("star", "red", .2, .2), _det("star", "blue", .7, .7)]) == (1, 1)
    left = g.EvalPrompt("position", "a red star to the left of a blue cross",
                        g.Requirement((g.Item("star", "red"), g.Item("cross", "blue")), relation="left of"))
    # wrong place: GenEval fails it, both items are still found
    wrong_place = [_det("star", "red", .7, .5), _det("cross", "blue", .2, .5)]
    assert not g.check(left, wrong_place) and g.items_found(left, wrong_place) == (2, 2)
    # colours swapped: both shapes, neither colour; a missing cross: one shape
    assert g.items_found(left, [_det("star", "blue", .2, .5), _det("cross", "red", .7, .5)]) == (2, 0)
    assert g.items_found(left, [_det("star", "red", .2, .5), _det("circle", "blue", .7, .5)]) == (1, 1)
    report = g.Report(tuple(g.ImageResult(left, i, False, tuple(d), np.zeros((1, 1, 3), np.uint8)) for i, d in
                            enumerate([wrong_place, [_det("star", "blue", .2, .5)]])), 2)
    assert report.item_recall() == {"shape": 3 / 4, "shape_color": 2 / 4}


def test_report_counts_match_verdicts(tmp_path):
    prompts = g.prompt_set(False, seed=0, per_category=3)
    rng = np.random.default_rng(6)
    pairs, expected = [], defaultdict(int)
    for k, p in enumerate(prompts):
        # the first image shows the prompt; the second shows it only for every other prompt (else a blank)
        good = shapes.render(g.scene_for(p, rng), 128)
        second = good if k % 2 == 0 else shapes.render(shapes.Scene("white", ()), 128)
        pairs.append((p, [good, second]))
        expected[p.category] += 1 + (k % 2 == 0)
    report = g.evaluate(pairs)
    g.write_report(report, tmp_path)
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["images_per_prompt"] == 2
    for cat, n in expected.items():
        assert doc["categories"][cat]["passed"] == n
        assert doc["categories"][cat]["images"] == 6
    assert doc["overall"] == pytest.approx(np.mean([n / 6 for n in expected.values()]))
    # a blank image finds none of its prompt's items, a render of the prompt all of them
    items = {p: len(p.requirement.items) for p in prompts}
    found = sum(items[p] * (1 + (k % 2 == 0)) for k, p in enumerate(prompts))
    assert doc["item_recall"]["shape_color"] == pytest.approx(found / (2 * sum(items.values())))
    md = (tmp_path / "report.md").read_text()
    assert "2 images per prompt" in md
    for cat, n in expected.items():
        assert f"| {cat} | 3 | 6 | {n} | {n / 6:.3f} |" in md
    grid = cv2.imread(str(tmp_path / "grid.png"))
    assert grid.shape[0] == len(prompts) * (g.THUMB + 6) and grid.shape[1] == 2 * (g.THUMB + 6)


def test_evaluate_pipeline_seeds_and_batches():
    prompts = g.prompt_set(False, seed=0, per_category=2)
    calls = []

    def generate(texts, seeds):
        calls.append(list(seeds))
        by_text = {p.text: p for p in prompts}
        return np.stack([shapes.render(g.scene_for(by_text[t], np.random.default_rng(s)), 128)
                         for t, s in zip(texts, seeds)])

    report = g.evaluate_pipeline(generate, prompts, images_per_prompt=2, seed=100, batch_size=5)
    assert [s for c in calls for s in c] == list(range(100, 100 + 2 * len(prompts)))
    assert max(len(c) for c in calls) == 5
    assert report.image_accuracy == 1.0 and report.images_per_prompt == 2
    with pytest.raises(ValueError, match="generate_fn"):
        g.evaluate_pipeline(lambda t, s: np.zeros((len(t), 8, 8), np.uint8), prompts[:1], 1)


def test_images_outside_the_domain_pass_nothing():
    # Noise, texture and gradients are not flat shapes on a flat background: no detections, no passes.
    import sanaflow.geneval as g
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    stripes = np.repeat((rng.random((128, 1, 3)) * 255).astype(np.uint8), 128, axis=1)
    ramp = np.broadcast_to(np.linspace(0, 255, 128, dtype=np.uint8)[None, :, None], (128, 128, 3)).copy()
    blocks = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((16, 16, 1))).astype(np.uint8)
    prompts = g.prompt_set(held_out=False, per_category=5)
    for image in (noise, stripes, ramp, blocks):
        assert not any(g.check(p, g.detect(image)) for p in prompts)


def test_eval_cli_writes_a_report(tmp_path):
    import json
    from click.testing import CliRunner
    from sanaflow.cli import main
    result = CliRunner().invoke(main, ["eval", "--per-category", "1", "--images-per-prompt", "1", "--steps", "1",
                                       "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "report.json").read_text())
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "report.md").is_file()
    assert sum(c["prompts"] for c in doc["categories"].values()) == 6         # one prompt per category
    assert 0.0 <= doc["overall"] <= 1.0


def test_random_weights_pass_nothing():
    # The untrained pipeline draws noise-like images, and noise must not pass any category.
    import sanaflow.geneval as g
    from sanaflow.pipeline import GenerateRequest, random_pipeline
    pipe = random_pipeline()

    def generate(texts, seeds):
        req = GenerateRequest(prompts=tuple(texts), height=128, width=128, steps=2, seeds=tuple(seeds))
        with torch.no_grad():
            x = pipe.generate(req)
        return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)

    report = g.evaluate_pipeline(generate, g.prompt_set(held_out=True, per_category=2), images_per_prompt=2)
    assert report.overall == 0.0
