"""The model shipped inside the package (issue 7; recipe and measurements in docs/bundled-model.md): it loads with
no path and no network, fits the size budget, generates the requested size, and draws what a small fixed set of
prompts asks for, at a pass rate far above what a broken model would reach."""
import numpy as np
import pytest
import torch

from sanaflow.geneval import evaluate_pipeline, prompt_set
from sanaflow.pipeline import BUNDLED, GenerateRequest, load_default

# Measured on the shipped model with the prompts and seeds of test_the_bundled_model_draws_the_prompts; the
# threshold leaves a wide margin under it, and lies far above a random pipeline's 0.
MEASURED_PASS_RATE = 0.938          # 30 / 32 images (2026-12-08, docs/bundled-model.md, fifteenth round)
THRESHOLD = 0.4                     # 13 / 32


@pytest.fixture(scope="module")
def pipe():
    return load_default()


def test_the_package_ships_a_model_within_the_size_budget():
    assert (BUNDLED / "model_index.json").is_file(), f"no bundled model in {BUNDLED}"
    size = sum(f.stat().st_size for f in BUNDLED.rglob("*") if f.is_file())
    assert size <= 40 * 2**20, f"bundled model is {size / 2**20:.1f} MiB, over the 40 MiB budget"


def test_load_default_gives_the_bundled_model(pipe):
    assert pipe.name == str(BUNDLED)
    assert pipe.native_size == 256
    assert pipe.guidance == 2.0
    assert all(p.dtype == torch.float32 for p in pipe.dit.parameters())   # stored fp16, loaded fp32


@pytest.mark.parametrize("height,width", [(256, 256), (192, 320)])
def test_the_bundled_model_generates_the_requested_size(pipe, height, width):
    image = pipe.generate(GenerateRequest(prompts=("a red circle",), height=height, width=width, steps=4))
    assert image.shape == (1, 3, height, width)
    assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1


def test_the_bundled_model_draws_the_prompts(pipe):
    """Single objects, plain and coloured, phrased as in training: 16 prompts x 2 images, the default settings
    (20 Flow-DPM-Solver steps, the model's own guidance)."""
    prompts = [p for p in prompt_set(held_out=False, seed=0, per_category=8)
               if p.category in ("single_object", "colors")]

    def generate_fn(texts, seeds):
        req = GenerateRequest(prompts=tuple(texts), height=256, width=256, seeds=tuple(seeds))
        return (pipe.generate(req).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)

    report = evaluate_pipeline(generate_fn, prompts, images_per_prompt=2, seed=0)
    assert report.overall >= THRESHOLD, f"pass rate {report.overall:.3f} < {THRESHOLD} (measured {MEASURED_PASS_RATE})"
