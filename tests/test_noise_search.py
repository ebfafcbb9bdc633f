"""Noise search: each score against a closed-form flow, and the search against plain generation."""
import pytest
import torch

from sanaflow.flow import gaussian_mixture_velocity
from sanaflow.noise_search import (
    candidate_seeds,
    curvature,
    prompt_gain,
    recording,
    score_samples,
    search,
    stability,
)
from sanaflow.pipeline import GenerateRequest, random_pipeline
from sanaflow.samplers import euler, flow_times


def point_velocity(point):
    """The exact velocity when all data sit at `point`: x_t = (1 - t) point + t noise, so v = (x_t - point) / t."""
    return lambda x, t: (x - point) / t.view(-1, *[1] * (x.dim() - 1))


def test_curvature_is_zero_on_a_straight_path_and_positive_on_a_bent_one():
    noise = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    ts = flow_times(10, 3.0)
    straight, seen = recording(point_velocity(torch.zeros(8)))    # one data point: straight lines, v constant
    euler(straight, noise, ts)
    assert len(seen) == 10
    torch.testing.assert_close(curvature(seen), torch.zeros(3), atol=1e-8, rtol=0)
    mixture = gaussian_mixture_velocity(torch.stack([torch.full((8,), -2.0), torch.full((8,), 2.0)]),
                                        torch.tensor([0.1, 0.1]), torch.tensor([0.5, 0.5]))
    bent, seen = recording(mixture)
    euler(bent, noise, ts)
    assert (curvature(seen) > 1e-3).all()
    with pytest.raises(ValueError, match="velocities"):
        curvature(seen[:1])


def test_stability_is_one_for_an_exact_inverse_and_falls_with_a_coarse_one():
    g = torch.Generator().manual_seed(1)
    means = torch.randn(4, 16, generator=g) * 2
    model_fn = gaussian_mixture_velocity(means, torch.full((4,), 0.3), torch.full((4,), 0.25))
    noise = torch.randn(6, 16, generator=g)
    x0 = euler(model_fn, noise, flow_times(400, 3.0))        # ~ the exact ODE solution
    fine = stability(model_fn, noise, x0, flow_times(400, 3.0))
    coarse = stability(model_fn, noise, x0, flow_times(4, 3.0))
    assert (fine > 0.999).all()
    assert (coarse < fine).all() and (coarse < 0.999).any()
    # independent check of the cosine: against a noise unrelated to x0 the score is near 0
    other = torch.randn(6, 16, generator=g)
    assert stability(model_fn, other, x0, flow_times(400, 3.0)).abs().max() < 0.8


def test_prompt_gain_prefers_the_sample_the_prompt_explains():
    a, b = torch.full((1, 4, 2, 2), 1.0), torch.full((1, 4, 2, 2), -1.0)
    text, null = point_velocity(a), point_velocity(b)     # the "prompt" puts every sample at a, no prompt at b

    def pair(x, t):
        return null(x, t), text(x, t)

    probe = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    gain = prompt_gain(pair, torch.cat([a, b]), probe, ts=(0.3, 0.7))
    assert gain.shape == (2, 2)
    assert (gain[:, 0] > 0).all() and (gain[:, 1] < 0).all()
    # at x0 = a the text branch's error is exactly 0 and the null branch's is ((a - b) / t)^2 per element
    for i, t in enumerate((0.3, 0.7)):
        torch.testing.assert_close(gain[i, 0], torch.tensor((2 / t) ** 2), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def pipe():
    return random_pipeline(seed=0)


def request(prompts=("a red circle",), seeds=(3,), ipp=1, guidance=2.0):
    return GenerateRequest(prompts=prompts, height=64, width=64, steps=4, guidance=guidance, seeds=seeds,
                           images_per_prompt=ipp)


def test_candidate_seeds_are_disjoint_and_one_candidate_is_the_seed_itself():
    assert candidate_seeds(7, 1) == [7]
    sets = [set(candidate_seeds(s, 4)) for s in range(5)]
    assert all(len(x) == 4 for x in sets) and len(set().union(*sets)) == 20


def test_search_keeps_the_best_scoring_real_sample(pipe):
    req = request(prompts=("a red circle", "two blue squares"), seeds=(3, 4, 5, 6), ipp=2)
    res = search(pipe, req, candidates=3, score="prompt")
    assert res.latents.shape == (4, *pipe.latent_shape(req)) and res.scores.shape == (4, 3)
    for i, seed in enumerate(req.seeds):
        k = int(res.scores[i].argmax())
        assert res.seeds[i] == candidate_seeds(seed, 3)[k]
        # the kept latent is what plain generation draws from that candidate's seed, with the same prompt
        plain = pipe.generate(request(prompts=(req.prompts[i // 2],), seeds=(res.seeds[i],)), output="latent")
        torch.testing.assert_close(res.latents[i:i + 1], plain, atol=1e-4, rtol=1e-4)
    # generating the candidates in several calls changes nothing
    chunked = search(pipe, req, candidates=3, score="prompt", batch_size=5)
    assert chunked.seeds == res.seeds
    torch.testing.assert_close(chunked.scores, res.scores, atol=1e-4, rtol=1e-3)


def test_one_candidate_is_plain_generation(pipe):
    req = request(seeds=(11,))
    res = search(pipe, req, candidates=1, score="curvature")
    torch.testing.assert_close(res.latents, pipe.generate(req, output="latent"), atol=1e-5, rtol=1e-5)
    assert res.seeds == (11,)


def test_score_samples_gives_every_score_for_every_image(pipe):
    req = request(seeds=(0, 1, 2), ipp=3)
    s = score_samples(pipe, req)
    assert set(s.scores) == {"prompt", "stability", "curvature"}
    assert all(v.shape == (3,) and torch.isfinite(v).all() for v in s.scores.values())
    assert (s.scores["curvature"] >= 0).all() and (s.scores["stability"].abs() <= 1 + 1e-6).all()


@pytest.mark.parametrize("kwargs, name", [({"candidates": 0}, "candidates"), ({"candidates": 2, "score": "clip"}, "score")])
def test_bad_search_arguments_are_named(pipe, kwargs, name):
    with pytest.raises(ValueError, match=name):
        search(pipe, request(), **kwargs)
    with pytest.raises(ValueError, match="inversion_steps"):
        score_samples(pipe, request(), inversion_steps=0)
