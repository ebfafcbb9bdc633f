"""A whole SANA folder written by diffusers' SanaPipeline.save_pretrained: loaded by us, it gives diffusers' outputs;
and one written by our Pipeline.save_pretrained: loaded by diffusers, it gives ours."""
import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SanaPipeline
from diffusers import SanaTransformer2DModel
from tiny_text import make_gemma, make_tokenizer

from sanaflow.dcae import DCAE, DCAE_PRESETS
from sanaflow.dit import DIT_PRESETS, DiT
from sanaflow.hub import CheckpointError
from sanaflow.pipeline import GenerateRequest, Pipeline, initial_noise
from sanaflow.text import CHI_DIFFUSERS, TextConfig, TextEncoder

TRANSFORMER = dict(patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2,
                   attention_head_dim=8, num_cross_attention_heads=2, cross_attention_head_dim=8,
                   cross_attention_dim=16, caption_channels=8, sample_size=32)
VAE = dict(in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
           decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
           decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
           encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
           upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
           scaling_factor=0.41407)


def diffusers_pipeline(scheduler):
    torch.manual_seed(0)
    tok = make_tokenizer()
    return SanaPipeline(tokenizer=tok, text_encoder=make_gemma(len(tok)), vae=AutoencoderDC(**VAE).eval(),
                        transformer=SanaTransformer2DModel(**TRANSFORMER).eval(), scheduler=scheduler)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A DPM-Solver pipeline folder (the scheduler of official SANA folders), transformer sharded."""
    path = tmp_path_factory.mktemp("sana")
    pipe = diffusers_pipeline(DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                          prediction_type="flow_prediction"))
    pipe.save_pretrained(path)
    pipe.transformer.save_pretrained(path / "transformer", max_shard_size="10KB")   # sharded, with an index
    return pipe, path


def test_folder_layout_is_diffusers(saved):
    _, path = saved
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "SanaPipeline" and index["vae"] == ["diffusers", "AutoencoderDC"]
    assert (path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()


def test_components_match_diffusers(saved):
    pipe, path = saved
    ours = Pipeline.from_pretrained(path)
    assert ours.flow_shift == 3.0 and ours.vae.cfg.compression == 2
    g = torch.Generator().manual_seed(0)
    x, image = torch.randn(2, 4, 6, 10, generator=g), torch.rand(2, 3, 12, 20, generator=g) * 2 - 1
    prompts = ["A Cat ", "a very long red dog sitting on the mat"]
    with torch.no_grad():
        embeds, mask, _, _ = pipe.encode_prompt(prompts, complex_human_instruction=list(CHI_DIFFUSERS))
        ours_embeds, ours_mask = ours.text.encode(prompts)           # default: diffusers' CHI and lower-casing
        torch.testing.assert_close(ours_embeds, embeds, atol=1e-6, rtol=0)
        assert torch.equal(ours_mask, mask)
        t = torch.tensor([999.0, 3.0])
        v_ref = pipe.transformer(x, encoder_hidden_states=embeds, timestep=t, encoder_attention_mask=mask).sample
        torch.testing.assert_close(ours.dit(x, t, embeds, mask), v_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.vae.decode(x), pipe.vae.decode(x / 0.41407).sample, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.vae.encode(image), pipe.vae.encode(image).latent * 0.41407, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", ["dpm", "euler"])
@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_end_to_end_images_match_diffusers(saved, tmp_path, sampler, guidance):
    pipe, path = saved
    if sampler == "euler":
        pipe = SanaPipeline.from_pretrained(path, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    prompts, steps = ["a red cat", "Apples on the mat"], 5
    latents = initial_noise([11, 12], (4, 16, 32))
    expected = pipe(prompts, height=32, width=64, num_inference_steps=steps, guidance_scale=guidance,
                    latents=latents.clone(), output_type="pt", use_resolution_binning=False).images
    ours = Pipeline.from_pretrained(path)
    req = GenerateRequest(prompts=tuple(prompts), height=32, width=64, steps=steps, guidance=guidance,
                          seeds=(11, 12), sampler=sampler)
    torch.testing.assert_close(ours.generate(req, latents=latents), expected, atol=1e-4, rtol=0)
    # The same seeds without explicit latents: the same noise, so the same images.
    torch.testing.assert_close(ours.generate(req), expected, atol=1e-4, rtol=0)


def test_one_image_reproduces_diffusers_seeding(saved):
    pipe, path = saved
    expected = pipe("a dog", height=32, width=32, num_inference_steps=3, output_type="pt",
                    generator=torch.Generator("cpu").manual_seed(5), use_resolution_binning=False).images
    got = Pipeline.from_pretrained(path).generate(GenerateRequest(prompts=("a dog",), height=32, width=32, steps=3,
                                                                  seeds=(5,)))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_missing_component_is_named(saved, tmp_path):
    _, path = saved
    (tmp_path / "model_index.json").write_text((path / "model_index.json").read_text())
    with pytest.raises(FileNotFoundError, match="transformer"):
        Pipeline.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Pipeline.from_pretrained(tmp_path / "nowhere")


def test_bf16_variant_folder_loads_every_component(saved, tmp_path):
    pipe, _ = saved
    pipe.to(torch.bfloat16).save_pretrained(tmp_path, variant="bf16")      # model.bf16.safetensors, ...
    pipe.to(torch.float32)
    pipe = SanaPipeline.from_pretrained(tmp_path, variant="bf16", dtype=torch.float32)   # same files
    assert not (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").exists()
    ours = Pipeline.from_pretrained(tmp_path)                               # variant detected per folder
    assert next(ours.text.model.parameters()).dtype == torch.float32        # fp32 unless asked, like diffusers
    with torch.no_grad():
        expected, _, _, _ = pipe.encode_prompt(["a cat"], complex_human_instruction=list(CHI_DIFFUSERS))
        torch.testing.assert_close(ours.text.encode(["a cat"])[0], expected, atol=1e-6, rtol=0)
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(ours.vae.decode(z), pipe.vae.decode(z / 0.41407).sample, atol=1e-5, rtol=0)


# ---- issue 4: seeds, guidance, binning, inversion, the CLI, bad input ----------------------------------------------


def test_same_seed_same_image_at_any_batch_size_and_other_seeds_differ(saved):
    _, path = saved
    pipe = Pipeline.from_pretrained(path)
    one = pipe.generate(GenerateRequest(prompts=("a cat",), height=32, width=32, steps=4, seeds=(7,)))
    three = pipe.generate(GenerateRequest(prompts=("a cat",), height=32, width=32, steps=4, seeds=(5, 6, 7),
                                          images_per_prompt=3))
    torch.testing.assert_close(three[2:], one, atol=1e-5, rtol=0)   # batching changes float summation order only
    assert (three[0] - three[1]).abs().max() > 1e-3 and (three[1] - three[2]).abs().max() > 1e-3


def test_guidance_is_the_cfg_formula_and_scale_one_is_the_conditional_model(saved):
    from sanaflow.pipeline import classifier_free, dit_velocity
    _, path = saved
    pipe = Pipeline.from_pretrained(path)
    c = pipe.text.encode_for_cfg(["a red cat", "the mat"], "blurry")
    x, t = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0)), torch.tensor([0.7, 0.7])
    v_text = dit_velocity(pipe.dit, c.text, c.text_mask, True)(x, t)          # separate, unbatched calls
    v_null = dit_velocity(pipe.dit, c.null_text, c.null_mask, True)(x, t)
    assert (v_text - v_null).abs().max() > 1e-3                               # the prompts matter
    for scale in (1.0, 4.5, 0.0):
        cfg = classifier_free(pipe.dit, c.text, c.text_mask, c.null_text, c.null_mask, scale, True)(x, t)
        torch.testing.assert_close(cfg, v_null + scale * (v_text - v_null), atol=1e-5, rtol=0)
    torch.testing.assert_close(classifier_free(pipe.dit, c.text, c.text_mask, c.null_text, c.null_mask, 1.0, True)(x, t),
                               v_text, atol=1e-6, rtol=0)


def test_aspect_ratio_bins_are_diffusers_tables():
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
    from diffusers.pipelines.sana.pipeline_sana import ASPECT_RATIO_4096_BIN
    from sanaflow.pipeline import aspect_ratio_bins, snap_to_bin
    for native, table in ((512, ASPECT_RATIO_512_BIN), (1024, ASPECT_RATIO_1024_BIN), (2048, ASPECT_RATIO_2048_BIN),
                          (4096, ASPECT_RATIO_4096_BIN)):
        assert aspect_ratio_bins(native) == {k: (int(h), int(w)) for k, (h, w) in table.items()}   # order too
    # diffusers-interop §4.4 examples on the 1024 table
    assert [snap_to_bin(h, w, 1024) for h, w in ((1024, 1024), (720, 1280), (1000, 1500), (512, 512), (32, 32))] == \
        [(1024, 1024), (768, 1344), (832, 1216), (1024, 1024), (1024, 1024)]
    with pytest.raises(ValueError, match="256"):
        aspect_ratio_bins(256)


def test_resolution_binning_matches_diffusers(tmp_path):
    torch.manual_seed(0)
    tok = make_tokenizer()
    pipe = SanaPipeline(tokenizer=tok, text_encoder=make_gemma(len(tok)), vae=AutoencoderDC(**VAE).eval(),
                        transformer=SanaTransformer2DModel(**{**TRANSFORMER, "sample_size": 16}).eval(),
                        scheduler=DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                              prediction_type="flow_prediction"))
    pipe.save_pretrained(tmp_path)
    # 90 x 220: ratio 0.41 -> bin "0.42" of the 512 table, 320 x 768, latents 160 x 384 with this 2x autoencoder
    expected = pipe("a cat", height=90, width=220, num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                    generator=torch.Generator("cpu").manual_seed(3)).images
    got = Pipeline.from_pretrained(tmp_path).generate(
        GenerateRequest(prompts=("a cat",), height=90, width=220, steps=2, guidance=1.0, seeds=(3,),
                        resolution_binning=True))
    assert got.shape == expected.shape == (1, 3, 90, 220)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_pipeline_inversion_recovers_the_noise(saved):
    _, path = saved
    pipe = Pipeline.from_pretrained(path)
    for sampler in ("dpm", "euler"):
        req = GenerateRequest(prompts=("a cat", "a dog"), height=32, width=32, steps=50, guidance=1.0, seeds=(1, 2),
                              sampler=sampler, images_per_prompt=1)
        noise = initial_noise(req.seeds, (4, 16, 16))
        latents = pipe.generate(req, latents=noise, output="latent")
        recovered = pipe.invert(req, latents)
        cos = torch.nn.functional.cosine_similarity(recovered.flatten(1), noise.flatten(1))
        assert cos.min() >= 0.99, (sampler, cos)


@pytest.mark.parametrize("changes, name", [
    (dict(steps=0), "steps"), (dict(guidance=float("nan")), "guidance"), (dict(guidance=float("inf")), "guidance"),
    (dict(height=100), "height"), (dict(width=48), "width"), (dict(prompts=()), "prompts"),
    (dict(seeds=(1, 2)), "seeds"), (dict(sampler="heun"), "sampler"), (dict(images_per_prompt=0), "images_per_prompt"),
])
def test_bad_requests_name_the_parameter(changes, name):
    base = dict(prompts=("a cat",), height=64, width=64, steps=4, seeds=(0,))
    with pytest.raises(ValueError, match=name):
        GenerateRequest(**{**base, **changes})
    GenerateRequest(**{**base, "height": 100, "resolution_binning": True})     # any size, once binning is on


def test_cli_generate_writes_a_png_with_its_parameters(saved, tmp_path):
    from click.testing import CliRunner
    from PIL import Image
    from sanaflow.cli import main
    _, path = saved
    out = tmp_path / "cat.png"
    result = CliRunner().invoke(main, ["generate", "a red cat", "--model", str(path), "-o", str(out), "--steps", "3",
                                       "--seed", "4", "--height", "32", "--width", "64", "--sampler", "euler"])
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert image.size == (64, 32)
    assert image.text["prompt"] == "a red cat" and image.text["seed"] == "4" and image.text["sampler"] == "euler"
    expected = Pipeline.from_pretrained(path).generate(GenerateRequest(
        prompts=("a red cat",), height=32, width=64, steps=3, seeds=(4,), sampler="euler"))[0]
    pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 255
    assert (pixels - expected).abs().max() <= 1 / 255 + 1e-6                  # 8-bit rounding only
    bad = CliRunner().invoke(main, ["generate", "a cat", "--model", str(path), "--height", "48", "-o", str(out)])
    assert bad.exit_code != 0 and "height=48" in bad.output


def test_cli_generate_with_noise_search_writes_the_kept_candidate(saved, tmp_path):
    from click.testing import CliRunner
    from PIL import Image
    from sanaflow.cli import main
    from sanaflow.noise_search import candidate_seeds
    _, path = saved
    out = tmp_path / "cat.png"
    result = CliRunner().invoke(main, ["generate", "a red cat", "--model", str(path), "-o", str(out), "--steps", "3",
                                       "--seed", "2", "--height", "32", "--width", "32", "--candidates", "3",
                                       "--search", "curvature"])
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    kept = int(image.text["seed"])
    assert kept in candidate_seeds(2, 3) and image.text["candidates"] == "3" and image.text["search"] == "curvature"
    expected = Pipeline.from_pretrained(path).generate(GenerateRequest(
        prompts=("a red cat",), height=32, width=32, steps=3, seeds=(kept,)))[0]
    pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 255
    assert (pixels - expected).abs().max() <= 1 / 255 + 1e-4                  # the PNG redraws from its own seed


# ---- Pipeline.save_pretrained: a SanaPipeline folder that diffusers and we both load ---------------------------------


def our_pipeline(text_config: TextConfig | None = None, flow_shift=2.5, seed=1):
    """A tiny Pipeline from our own modules (random weights, every tensor off its init) and the tiny Gemma."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(seed)
    dit, vae = DiT(DIT_PRESETS["tiny"]), DCAE(dataclasses.replace(DCAE_PRESETS["tiny"], scaling_factor=0.6))
    with torch.no_grad():    # norm weights start at 1 and biases at 0: move them, so a lost tensor shows
        for p in [*dit.parameters(), *vae.parameters()]:
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    tok = make_tokenizer()
    return Pipeline(dit.eval(), vae.eval(), TextEncoder(make_gemma(len(tok)), tok, text_config or TextConfig()),
                    flow_shift=flow_shift)


def folder_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_saved_pipeline_is_a_diffusers_folder_with_the_same_images(tmp_path):
    ours = our_pipeline()                                   # flow shift 2.5: a lost shift changes the images
    folder = ours.save_pretrained(tmp_path / "sana")
    pipe = SanaPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    official = DPMSolverMultistepScheduler(flow_shift=2.5, use_flow_sigmas=True, prediction_type="flow_prediction")
    public = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    assert public == {k: v for k, v in official.config.items() if not k.startswith("_")}   # convert_sana_to_diffusers
    # Every file diffusers would write itself for these components, field for field.
    pipe.save_pretrained(tmp_path / "resaved")
    for name in ("model_index.json", "scheduler/scheduler_config.json", "transformer/config.json", "vae/config.json"):
        mine, theirs = (json.loads((f / name).read_text()) for f in (folder, tmp_path / "resaved"))
        theirs.pop("_name_or_path", None)                   # where diffusers loaded from, added on re-saving
        mine.pop("_sanaflow_text_config", None)             # ours alone; diffusers drops "_" keys on loading
        mine.pop("_sanaflow_guidance", None)
        assert mine == theirs, name

    prompts, steps = ["a red cat", "Apples on the mat"], 5
    latents = initial_noise([11, 12], (4, 16, 32))
    expected = pipe(prompts, height=32, width=64, num_inference_steps=steps, guidance_scale=4.5,
                    latents=latents.clone(), output_type="pt", use_resolution_binning=False).images
    req = GenerateRequest(prompts=tuple(prompts), height=32, width=64, steps=steps, guidance=4.5, seeds=(11, 12))
    got = ours.generate(req, latents=latents)
    assert ((got > 0) & (got < 1)).float().mean() > 0.5    # mostly unclamped pixels: clamping hides no error
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)   # as the loading parity test above


def test_saved_pipeline_round_trips_with_its_text_config(tmp_path, saved):
    config = TextConfig(chi=None, max_length=16, lowercase=False, negative_uses_prompt_mask=True)
    ours = our_pipeline(config, flow_shift=4.0)
    folder = ours.save_pretrained(tmp_path / "sana")
    back = Pipeline.from_pretrained(folder)
    assert back.text.config == config and back.flow_shift == 4.0
    for a, b in ((ours.dit, back.dit), (ours.vae, back.vae), (ours.text.model, back.text.model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    req = GenerateRequest(prompts=("A red cat",), negative_prompt="blurry", height=32, width=32, steps=3, seeds=(3,))
    assert torch.equal(back.generate(req), ours.generate(req))                 # same weights, same code
    assert Pipeline.from_pretrained(folder, text_config=TextConfig()).text.config == TextConfig()   # explicit wins
    assert Pipeline.from_pretrained(saved[1]).text.config == TextConfig()       # a folder diffusers wrote


def test_the_folders_default_guidance_round_trips_and_the_cli_uses_it(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from sanaflow.cli import main
    ours = our_pipeline()
    ours.guidance = 1.0
    folder = ours.save_pretrained(tmp_path / "sana")
    assert Pipeline.from_pretrained(folder).guidance == 1.0
    runner, out = CliRunner(), tmp_path / "a.png"
    args = ["generate", "a red cat", "--model", str(folder), "-o", str(out), "--steps", "2", "--height", "32",
            "--width", "32"]
    assert runner.invoke(main, args).exit_code == 0
    req = GenerateRequest(prompts=("a red cat",), height=32, width=32, steps=2, seeds=(0,), guidance=1.0)
    image = torch.from_numpy(np.asarray(Image.open(out))).permute(2, 0, 1).float() / 255
    assert Image.open(out).text["guidance"] == "1.0"
    assert (image - ours.generate(req)[0]).abs().max() <= 1 / 255 + 1e-6       # guidance 1, not 4.5
    unset = dataclasses.replace(req, guidance=None)                             # a request without a scale
    assert torch.equal(ours.generate(unset), ours.generate(req))
    assert not torch.equal(ours.generate(unset), ours.generate(dataclasses.replace(req, guidance=4.5)))
    assert runner.invoke(main, [*args, "--guidance", "3"]).exit_code == 0 and Image.open(out).text["guidance"] == "3.0"
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_sanaflow_guidance": "high"}))
    with pytest.raises(CheckpointError, match=r"model_index\.json.*_sanaflow_guidance"):
        Pipeline.from_pretrained(folder)


def test_bad_stored_text_config_is_named(tmp_path):
    folder = our_pipeline().save_pretrained(tmp_path / "sana")
    index = json.loads((folder / "model_index.json").read_text())
    for bad, name in (({"max_length": "16"}, "max_length"), ({"chi": "one line"}, "chi"),
                      ({"lowercase": "false"}, "lowercase"), ({"max_lenght": 16}, "max_lenght")):
        (folder / "model_index.json").write_text(json.dumps({**index, "_sanaflow_text_config": bad}))
        with pytest.raises(CheckpointError, match=rf"model_index\.json.*{name}"):
            Pipeline.from_pretrained(folder)


def test_a_failed_pipeline_save_leaves_the_previous_folder(tmp_path, monkeypatch):
    first = our_pipeline()
    folder = first.save_pretrained(tmp_path / "sana")
    before = folder_bytes(folder)
    second = our_pipeline(flow_shift=5.0, seed=2)                                   # other weights, other files

    def crash(*args, **kwargs):     # after transformer/, vae/ and text_encoder/ are written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(second.text.tokenizer, "save_pretrained", crash)
    with pytest.raises(OSError, match=re.escape(str(folder))):
        second.save_pretrained(folder)
    assert folder_bytes(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["sana"]                       # no temporary folder left behind
    req = GenerateRequest(prompts=("a cat",), height=32, width=32, steps=2, seeds=(0,))
    assert torch.equal(Pipeline.from_pretrained(folder).generate(req), first.generate(req))


def test_a_pipeline_diffusers_cannot_express_is_refused_before_writing(tmp_path):
    ours = our_pipeline()
    nvlabs_eps = DiT(dataclasses.replace(ours.dit.cfg, linear_attn_eps=1e-8))      # diffusers hard-codes 1e-15
    with pytest.raises(ValueError, match=r"sana.*linear_attn_eps"):
        Pipeline(nvlabs_eps, ours.vae, ours.text).save_pretrained(tmp_path / "sana")
    assert list(tmp_path.iterdir()) == []


def test_trimmed_text_padding_gives_the_same_velocity():
    """dit_velocity drops text columns every row masks: same output as the full padded text; a row with no real
    token (uniform attention over all columns) keeps everything."""
    from sanaflow.pipeline import dit_velocity, trim_padding
    torch.manual_seed(0)
    dit = DiT(dataclasses.replace(DIT_PRESETS["tiny"], depth=2)).eval()
    dit.init_weights()
    x, t = torch.randn(3, 4, 4, 4), torch.rand(3)
    text = torch.randn(3, 12, dit.cfg.caption_channels)
    mask = (torch.arange(12)[None] < torch.tensor([[3], [7], [1]])).long()    # right padding, longest 7
    text_cut, mask_cut = trim_padding(text, mask)
    assert mask_cut.shape == (3, 7) and text_cut.shape == (3, 7, dit.cfg.caption_channels)
    with torch.no_grad():
        full = dit(x, t * 1000, text, mask)
        cut = dit_velocity(dit, text, mask, integer_t=False)(x, t)
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-6)
    mask[2] = 0
    assert trim_padding(text, mask)[1].shape == (3, 12)
    assert trim_padding(text, None)[0] is text
