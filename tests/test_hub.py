"""Loading official-format weights from local paths: diffusers folders and NVlabs files, and every bad-input case;
writing diffusers folders that diffusers loads with the same outputs."""
import dataclasses
import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderDC, SanaTransformer2DModel
from safetensors.torch import load_file, save_file

from sanaflow import hub
from sanaflow.dcae import DCAE, DCAE_PRESETS
from sanaflow.dit import DIT_PRESETS, DiT, DiTConfig
from sanaflow.hub import (CheckpointError, load_dcae, load_dit, load_original_dit, read_state_dict, save_dcae,
                          save_dit)
from sanaflow.keymaps import (dcae_config_from_diffusers, dcae_config_to_diffusers, dcae_to_diffusers,
                              dit_config_from_diffusers, dit_config_to_diffusers, dit_to_diffusers)

TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=3,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
            sample_size=8)


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    return SanaTransformer2DModel(**TINY).eval()


def run(model, diffusers_model=False):
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 6, 10, generator=g), torch.randn(2, 5, 12, generator=g)
    t, mask = torch.tensor([900.0, 20.0]), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        if diffusers_model:
            return model(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask).sample
        return model(x, t, text, mask)


@pytest.mark.parametrize("kwargs", [{}, dict(max_shard_size="20KB"), dict(variant="fp16"),
                                    dict(variant="bf16", max_shard_size="20KB")])
def test_diffusers_folder_loads_and_matches(ref, tmp_path, kwargs):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(kwargs.get("variant"), torch.float32)
    saved = SanaTransformer2DModel(**TINY).eval()
    saved.load_state_dict(ref.state_dict())
    saved.to(dtype).save_pretrained(tmp_path, **kwargs)
    if "max_shard_size" in kwargs:
        assert len(list(tmp_path.glob("*.safetensors"))) > 1          # really sharded
    ours = load_dit(tmp_path)                                          # the variant is found on its own
    assert next(ours.parameters()).dtype == torch.float32              # like diffusers: fp32 unless asked
    expected = run(saved.float(), diffusers_model=True)                # same (rounded) weights in diffusers
    torch.testing.assert_close(run(ours), expected, atol=1e-5, rtol=0)


def test_load_in_half_precision(ref, tmp_path):
    ref.save_pretrained(tmp_path)
    assert next(load_dit(tmp_path, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16


def to_nvlabs(sd: dict, depth: int) -> dict:
    """diffusers -> NVlabs/Sana names, written from the table of sana-spec §1.13 (the inverse of diffusers'
    scripts/convert_sana_to_diffusers.py), with the buffers real NVlabs files carry."""
    out = {}
    ren = {"patch_embed.proj.": "x_embedder.proj.", "time_embed.emb.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
           "time_embed.emb.timestep_embedder.linear_2.": "t_embedder.mlp.2.", "time_embed.linear.": "t_block.1.",
           "caption_projection.linear_1.": "y_embedder.y_proj.fc1.", "caption_projection.linear_2.": "y_embedder.y_proj.fc2.",
           "caption_norm.": "attention_y_norm.", "proj_out.": "final_layer.linear."}
    for k, v in sd.items():
        for a, b in ren.items():
            if k.startswith(a):
                out[b + k[len(a):]] = v
    out["final_layer.scale_shift_table"] = sd["scale_shift_table"]
    for i in range(depth):
        s, d = f"transformer_blocks.{i}.", f"blocks.{i}."
        out[d + "scale_shift_table"] = sd[s + "scale_shift_table"]
        out[d + "attn.qkv.weight"] = torch.cat([sd[f"{s}attn1.to_{n}.weight"] for n in "qkv"])
        for p in ("weight", "bias"):
            out[f"{d}attn.proj.{p}"] = sd[f"{s}attn1.to_out.0.{p}"]
            out[f"{d}cross_attn.q_linear.{p}"] = sd[f"{s}attn2.to_q.{p}"]
            out[f"{d}cross_attn.kv_linear.{p}"] = torch.cat([sd[f"{s}attn2.to_k.{p}"], sd[f"{s}attn2.to_v.{p}"]])
            out[f"{d}cross_attn.proj.{p}"] = sd[f"{s}attn2.to_out.0.{p}"]
            out[f"{d}mlp.inverted_conv.conv.{p}"] = sd[f"{s}ff.conv_inverted.{p}"]
            out[f"{d}mlp.depth_conv.conv.{p}"] = sd[f"{s}ff.conv_depth.{p}"]
        out[d + "mlp.point_conv.conv.weight"] = sd[s + "ff.conv_point.weight"]
    D = sd["patch_embed.proj.weight"].shape[0]
    out["pos_embed"] = torch.zeros(1, 64, D)                               # NoPE models still carry it
    out["y_embedder.y_embedding"] = torch.randn(300, sd["caption_projection.linear_1.weight"].shape[1])
    return out


def test_nvlabs_pth_converts_to_the_same_model(ref, tmp_path):
    path = tmp_path / "Sana_tiny.pth"
    torch.save({"state_dict": to_nvlabs(ref.state_dict(), TINY["num_layers"]), "epoch": 3}, path)
    ours = load_original_dit(path, cross_heads=2, head_dim=8)       # non-official shapes: head sizes must be given
    assert ours.cfg.depth == 3 and ours.cfg.width == 16 and ours.cfg.pe_interpolation is None
    torch.testing.assert_close(run(ours), run(ref, diffusers_model=True), atol=1e-5, rtol=0)


def test_nvlabs_safetensors_converts_too(ref, tmp_path):
    path = tmp_path / "sana.safetensors"
    save_file({k: v.contiguous() for k, v in to_nvlabs(ref.state_dict(), 3).items()}, path)
    torch.testing.assert_close(run(load_original_dit(path, cross_heads=2, head_dim=8)), run(ref, diffusers_model=True),
                               atol=1e-5, rtol=0)


def test_nvlabs_config_inference_for_official_shapes():
    from sanaflow.dit import DIT_PRESETS
    from sanaflow.keymaps import dit_config_from_original
    D = 2240   # 1.6B at 4K: only shapes matter, so fake tensors of the right sizes (on meta: no memory)
    with torch.device("meta"):
        sd = {"x_embedder.proj.weight": torch.empty(D, 32, 1, 1), "blocks.19.attn.qkv.weight": torch.empty(3 * D, D),
              "blocks.0.mlp.point_conv.conv.weight": torch.empty(D, 5600, 1, 1),
              "y_embedder.y_proj.fc1.weight": torch.empty(D, 2304), "final_layer.linear.weight": torch.empty(32, D),
              "pos_embed": torch.empty(1, 128 * 128, D)}
    assert dit_config_from_original(sd) == DIT_PRESETS["sana-1600m-4k"]


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "callback": print}, path)   # a pickled function
    with pytest.raises(CheckpointError, match="evil.pth"):
        read_state_dict(path)


# ---- bad input: every error names the file or folder and the keys -------------------------------------------------


@pytest.fixture()
def folder(ref, tmp_path):
    ref.save_pretrained(tmp_path)
    return tmp_path


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dit(tmp_path / "nowhere")


def test_missing_config(folder):
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_dit(folder)


def test_truncated_weights(folder):
    f = folder / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        load_dit(folder)


def test_missing_shard(ref, tmp_path):
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    next(tmp_path.glob("*-00002-of-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="00002"):
        load_dit(tmp_path)


def edit_weights(folder, fn):
    f = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f)


def test_missing_key_is_named(folder):
    edit_weights(folder, lambda sd: sd.pop("transformer_blocks.1.ff.conv_point.weight"))
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.1\.ff\.conv_point\.weight") as e:
        load_dit(folder)
    assert str(folder) in str(e.value)


def test_unexpected_key_is_named(folder):
    edit_weights(folder, lambda sd: sd.update({"transformer_blocks.1.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.1\.extra\.weight"):
        load_dit(folder)


def test_shape_mismatch_is_named(folder):
    edit_weights(folder, lambda sd: sd.update({"proj_out.weight": torch.zeros(5, 16)}))
    with pytest.raises(CheckpointError, match=r"final_linear\.weight.*\(5, 16\)"):
        load_dit(folder)


def test_config_that_disagrees_with_weights(folder):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_layers": 4}))
    with pytest.raises(CheckpointError, match="transformer_blocks.3"):
        load_dit(folder)


def test_unsupported_config_is_named(folder):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "guidance_embeds": True}))
    with pytest.raises(CheckpointError, match="guidance_embeds"):
        load_dit(folder)


def test_nvlabs_file_with_missing_keys(ref, tmp_path):
    sd = to_nvlabs(ref.state_dict(), 3)
    del sd["blocks.2.cross_attn.kv_linear.bias"]
    torch.save(sd, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=r"x\.pth.*blocks\.2\.cross_attn\.kv_linear\.bias"):
        load_original_dit(tmp_path / "x.pth", cross_heads=2, head_dim=8)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.pth").write_bytes(b"hello")
    with pytest.raises(CheckpointError, match="x.pth"):
        read_state_dict(tmp_path / "x.pth")


def test_original_dcae_files_convert_to_the_same_model(tmp_path):
    from test_dcae import TINY as DCAE_TINY, diffusers_model, diffusers_to_original
    from sanaflow.dcae import DCAE_PRESETS
    from sanaflow.hub import load_original_dcae
    ref = diffusers_model(DCAE_TINY)
    original = {k: v.contiguous() for k, v in diffusers_to_original(ref.state_dict()).items()}
    save_file(original, tmp_path / "model.safetensors")                     # mit-han-lab: a flat safetensors
    torch.save({"model": original}, tmp_path / "dcae.pth")                  # training checkpoints nest it
    z = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref.decode(z / 0.41407).sample
        for name in ("model.safetensors", "dcae.pth"):
            ours = load_original_dcae(tmp_path / name, config=DCAE_PRESETS["tiny"])
            torch.testing.assert_close(ours.decode(z), expected, atol=1e-5, rtol=0)
    del original["decoder.project_out.op_list.0.bias"]
    save_file(original, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"broken\.safetensors.*decoder\.project_out\.op_list\.0\.bias"):
        load_original_dcae(tmp_path / "broken.safetensors", config=DCAE_PRESETS["tiny"])


# ---- writing diffusers folders: diffusers loads what we write, and so do we ------------------------------------------

OUR_TINY = DiTConfig(in_channels=4, out_channels=4, width=16, depth=3, head_dim=8, cross_heads=2, caption_channels=12,
                     sample_size=8)      # = TINY above, in our vocabulary


def randomized(model, seed=0):
    """Every tensor moved off its init (norm weights start at 1, biases at 0), so that a dropped, swapped or
    mis-split tensor changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def diffusers_resaved_config(model, tmp_path):
    """config.json as diffusers itself writes it for `model`: the reference our config.json must equal."""
    model.save_pretrained(tmp_path / "resaved")
    config = json.loads((tmp_path / "resaved" / "config.json").read_text())
    config.pop("_name_or_path")            # where diffusers loaded it from, added on re-saving
    return config


@pytest.mark.parametrize("preset", sorted(DIT_PRESETS))
def test_dit_config_and_keys_to_diffusers_for_every_preset(preset):
    cfg = DIT_PRESETS[preset]
    kwargs = dit_config_to_diffusers(cfg)
    assert dit_config_from_diffusers(json.loads(json.dumps(kwargs))) == cfg          # through JSON, as on disk
    with torch.device("meta"):      # shapes only: no memory, no init
        ref = SanaTransformer2DModel(**kwargs).state_dict()
        ours = dit_to_diffusers(DiT(cfg).state_dict(), cfg)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


@pytest.mark.parametrize("preset", sorted(DCAE_PRESETS))
def test_dcae_config_and_keys_to_diffusers_for_every_preset(preset):
    cfg = DCAE_PRESETS[preset]
    config = dcae_config_to_diffusers(cfg)
    assert dcae_config_from_diffusers(json.loads(json.dumps(config))) == cfg
    with torch.device("meta"):
        ref = AutoencoderDC(**config).state_dict()
        ours = dcae_to_diffusers(DCAE(cfg).state_dict(), cfg)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


@pytest.mark.parametrize("changes", [
    {},
    dict(qk_norm=True, out_channels=8),                                         # SANA-1.5 norms; learned-sigma width
    dict(patch_size=2, pe_interpolation=1.0, sample_size=16, mlp_ratio=3.0),    # 2K-style sincos PE
])
def test_saved_dit_loads_in_diffusers_with_the_same_outputs(tmp_path, changes):
    torch.manual_seed(0)
    ours = randomized(DiT(dataclasses.replace(OUR_TINY, **changes)))
    folder = save_dit(ours, tmp_path / "transformer")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    ref = SanaTransformer2DModel.from_pretrained(folder).eval()
    # fp32 on both sides; differences are summation order (~1e-7), a wrong or mis-split tensor is O(0.1).
    torch.testing.assert_close(run(ref, diffusers_model=True), run(ours), atol=1e-5, rtol=0)
    written = json.loads((folder / "config.json").read_text())
    assert written == diffusers_resaved_config(ref, tmp_path)          # every field, as diffusers writes it
    back = load_dit(folder)
    assert back.cfg == ours.cfg
    assert_same_weights(back, ours)                                     # our round trip is exact


def test_saved_dit_in_another_dtype(tmp_path):
    torch.manual_seed(0)
    ours = randomized(DiT(OUR_TINY))
    save_dit(ours, tmp_path, dtype=torch.bfloat16)
    assert {v.dtype for v in load_file(tmp_path / "diffusion_pytorch_model.safetensors").values()} == {torch.bfloat16}
    assert_same_weights(load_dit(tmp_path, dtype=torch.bfloat16), ours.to(torch.bfloat16))


@pytest.mark.parametrize("name", ["tiny", "three_stage"])
def test_saved_dcae_loads_in_diffusers_with_the_same_outputs(tmp_path, name):
    from test_dcae import CONFIGS
    cfg = dataclasses.replace(dcae_config_from_diffusers(CONFIGS[name]), scaling_factor=0.3)
    torch.manual_seed(0)
    ours = randomized(DCAE(cfg))
    folder = save_dcae(ours, tmp_path / "vae")
    ref = AutoencoderDC.from_pretrained(folder).eval()
    assert ref.config.scaling_factor == 0.3
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 16, 24, generator=g) * 2 - 1
    z = torch.randn(2, cfg.latent_channels, 16 // cfg.compression, 24 // cfg.compression, generator=g)
    with torch.no_grad():     # ours scales by scaling_factor inside encode/decode; diffusers leaves it to the caller
        torch.testing.assert_close(ours.encode(image), ref.encode(image).latent * ref.config.scaling_factor,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.decode(z), ref.decode(z / ref.config.scaling_factor).sample, atol=1e-5, rtol=0)
    assert json.loads((folder / "config.json").read_text()) == diffusers_resaved_config(ref, tmp_path)
    back = load_dcae(folder)
    assert back.cfg == cfg and back.cfg.scaling_factor == 0.3
    assert_same_weights(back, ours)


def test_a_failed_write_leaves_the_previous_folder(tmp_path, monkeypatch):
    torch.manual_seed(0)
    first, second = randomized(DiT(OUR_TINY), seed=1), randomized(DiT(OUR_TINY), seed=2)
    folder = save_dit(first, tmp_path / "transformer")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def half_then_crash(tensors, path, metadata=None):    # a full disk or a kill in the middle of the weights
        Path(path).write_bytes(b"\0" * 100)
        raise RuntimeError("disk full")

    monkeypatch.setattr(hub, "save_file", half_then_crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_dit(second, folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["transformer"]              # no temporary folder left behind
    assert_same_weights(load_dit(folder), first)

    # The last step, renaming the new folder into place, fails: the old folder is put back.
    real_replace = os.replace

    def failing_publish(src, dst):
        if ".transformer.tmp-" in str(src):
            raise OSError(errno.EXDEV, "rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(hub.os, "replace", failing_publish)
    with pytest.raises(OSError, match=re.escape(str(folder))):
        save_dit(second, folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["transformer"]
    save_dit(second, folder)                                                     # and a good write replaces it
    assert_same_weights(load_dit(folder), second)
    assert [p.name for p in tmp_path.iterdir()] == ["transformer"]


def test_what_cannot_be_written_is_refused_before_writing(tmp_path):
    nvlabs_eps = DiT(dataclasses.replace(OUR_TINY, linear_attn_eps=1e-8))
    with pytest.raises(ValueError, match=r"transformer.*linear_attn_eps"):
        save_dit(nvlabs_eps, tmp_path / "transformer")
    with pytest.raises(TypeError, match=r"transformer.*SanaTransformer2DModel"):
        save_dit(SanaTransformer2DModel(**TINY), tmp_path / "transformer")
    with pytest.raises(ValueError, match=r"transformer.*dtype"):
        save_dit(DiT(OUR_TINY), tmp_path / "transformer", dtype=torch.int8)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(FileExistsError, match="file"):
        save_dcae(DCAE(DCAE_PRESETS["tiny"]), tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
