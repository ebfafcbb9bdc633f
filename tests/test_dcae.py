"""DC-AE (sanaflow.dcae) against diffusers' AutoencoderDC, an independent implementation, on the same weights.

Reference configs are written here in diffusers' own vocabulary (vae/config.json fields) and translated with
`dcae_config_from_diffusers`, so a wrong translation shows up as a failed strict load or a parity failure.
"""

import dataclasses
import json
import re

import pytest
import torch
from diffusers import AutoencoderDC
from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers

from sanaflow import dcae as dcae_module
from sanaflow.keymaps import dcae_config_from_diffusers, dcae_from_diffusers, dcae_from_original
from sanaflow.dcae import DCAE, DCAE_PRESETS, DCAEConfig

# fp32 parity bound: both sides run the same float32 ops in (almost) the same order; observed differences are
# ~1e-6, so 1e-5 leaves room for summation-order noise but not for a wrong weight, norm or shortcut.
ATOL = 1e-5

_COMMON = dict(downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
               decoder_act_fns="silu")

# diffusers' own AutoencoderDC test config (tests/models/autoencoders/test_models_autoencoder_dc.py).
TINY = dict(in_channels=3, latent_channels=4, attention_head_dim=2,
            encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
            encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1], scaling_factor=0.41407, **_COMMON)

# 4 stages, widths 8 -> 16 -> 16 -> 32: down groups g = 2, 4, 2 and up repeats r = 2, 4, 2; two ViT stages.
FOUR_STAGE = dict(in_channels=3, latent_channels=8, attention_head_dim=4,
                  encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
                  decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
                  encoder_block_out_channels=(8, 16, 16, 32), decoder_block_out_channels=(8, 16, 16, 32),
                  encoder_layers_per_block=(1, 1, 2, 1), decoder_layers_per_block=(1, 2, 1, 2),
                  encoder_qkv_multiscales=((), (), (5,), (5,)), decoder_qkv_multiscales=((), (), (5,), (5,)),
                  scaling_factor=0.3, **_COMMON)

# 3 stages, widths 8 -> 32 -> 32 (g = r = 1, then 4), a ViT stage without multi-scale branch, one with two
# (kernels 3 and 5), per-stage tuple forms of decoder_norm_types / decoder_act_fns.
THREE_STAGE = dict(in_channels=3, latent_channels=16, attention_head_dim=8,
                   encoder_block_types=["ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
                   decoder_block_types=["ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
                   encoder_block_out_channels=[8, 32, 32], decoder_block_out_channels=[8, 32, 32],
                   encoder_layers_per_block=[1, 1, 1], decoder_layers_per_block=[1, 2, 1],
                   encoder_qkv_multiscales=[[], [], [3, 5]], decoder_qkv_multiscales=[[], [], [3, 5]],
                   downsample_block_type="conv", upsample_block_type="interpolate",
                   decoder_norm_types=["rms_norm"] * 3, decoder_act_fns=["silu"] * 3, scaling_factor=0.5)

# SANA's dc-ae-f32c32-sana-1.0 (diffusers-interop.md §2.1).
SANA = dict(in_channels=3, latent_channels=32, attention_head_dim=32,
            encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
            decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
            encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
            decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
            encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
            encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
            decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
            encoder_out_shortcut=True, decoder_in_shortcut=True, decoder_conv_act_fn="relu",
            scaling_factor=0.41407, **_COMMON)

CONFIGS = {"tiny": TINY, "four_stage": FOUR_STAGE, "three_stage": THREE_STAGE}


def diffusers_model(config: dict) -> AutoencoderDC:
    torch.manual_seed(0)
    model = AutoencoderDC(**config).eval()
    # Norms start at weight 1, bias 0; randomise them so the test sees a swapped or dropped weight/bias.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.5 * torch.randn(p.shape, generator=g))
    return model


def our_model(d: AutoencoderDC) -> DCAE:
    cfg = dcae_config_from_diffusers(dict(d.config))
    model = DCAE(cfg).eval()
    model.load_state_dict(dcae_from_diffusers(d.state_dict(), cfg), strict=True)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return (a - b).abs().max().item()


@pytest.fixture
def branches(monkeypatch):
    """Records which LiteMLA attention branch ran, so each case provably covers what it claims."""
    seen = set()
    for name in ("linear_attention", "quadratic_attention"):
        original = getattr(dcae_module.LiteMLA, name)
        def wrapped(self, *args, _original=original, _name=name):
            seen.add(_name.split("_")[0])
            return _original(self, *args)
        monkeypatch.setattr(dcae_module.LiteMLA, name, wrapped)
    return seen


# (config, image (B, H, W), branches expected). Branch rule: linear iff H*W > head_dim at a ViT stage.
PARITY_CASES = [
    ("tiny", (2, 32, 32), {"linear"}),                       # ViT stage 16x16
    ("tiny", (2, 2, 4), {"quadratic"}),                      # ViT stage 1x2: N = 2 = head_dim, the boundary
    ("tiny", (1, 6, 2), {"linear"}),                         # 3x1: N = 3, just above it
    ("four_stage", (2, 16, 16), {"linear", "quadratic"}),    # ViT stages 4x4 (16 > 4) and 2x2 (4 = 4)
    ("four_stage", (2, 48, 32), {"linear"}),                 # 12x8 and 6x4, non-square
    ("four_stage", (1, 8, 8), {"quadratic"}),                # 2x2 and 1x1
    ("three_stage", (2, 16, 24), {"linear"}),                # 8x12 and 4x6 (24 > 8)
    ("three_stage", (2, 8, 4), {"quadratic"}),               # 4x2 (8 = 8) and 2x1
]


@pytest.mark.parametrize("name,bhw,expected", PARITY_CASES)
def test_encoder_and_decoder_match_diffusers(name, bhw, expected, branches):
    d = diffusers_model(CONFIGS[name])
    m = our_model(d)
    B, H, W = bhw
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, 3, H, W, generator=g)
    f = m.compression
    z = torch.randn(B, d.config.latent_channels, H // f, W // f, generator=g)
    with torch.no_grad():
        assert max_diff(m.encoder(x), d.encoder(x)) <= ATOL
        assert max_diff(m.decoder(z), d.decoder(z)) <= ATOL
        sf = d.config.scaling_factor
        assert max_diff(m.encode(x), d.encode(x).latent * sf) <= ATOL
        assert max_diff(m.decode(z), d.decode(z / sf).sample) <= ATOL
    assert branches == expected


@pytest.mark.parametrize("bhw", [(2, 2, 4), (2, 32, 32)], ids=["quadratic", "linear"])
def test_bf16_matches_diffusers_exactly(bhw):
    # In bf16 the attention branches differ in where they upcast (linear: q, k, v; quadratic: only the
    # normalisation) and the norm in where it rounds. Getting any of these wrong moves the output by one or two
    # bf16 ulps (measured: 0.008 at scale 1.7), so only exact equality sees it. Exact equality is reachable on
    # the tiny config: with 8 input channels, bf16 products are exact in fp32 and our fused 1x1 convs round
    # like diffusers' separate Linear layers.
    d = diffusers_model(TINY)
    m = our_model(d).to(torch.bfloat16)
    d = d.to(torch.bfloat16)
    B, H, W = bhw
    x = torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        z = d.encoder(x)
        assert torch.equal(m.encoder(x), z)
        assert torch.equal(m.decoder(z), d.decoder(z))


####################################################################################################################
# Parameter counts and config translation
####################################################################################################################

def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_sana_preset_parameter_count_on_meta():
    with torch.device("meta"):
        ours = DCAE(DCAE_PRESETS["dc-ae-f32c32-sana-1.0"])
        ref = AutoencoderDC(**SANA)
    assert n_params(ours) == n_params(ref) == 312_250_275       # spec §2.5 / interop §7.3
    assert DCAE_PRESETS["dc-ae-f32c32-sana-1.1"] == DCAE_PRESETS["dc-ae-f32c32-sana-1.0"]
    assert ours.compression == 32
    # Full-size key map, checked on meta tensors: every diffusers key used, every one of ours filled, same shapes.
    converted = dcae_from_diffusers(ref.state_dict(), DCAE_PRESETS["dc-ae-f32c32-sana-1.0"])
    assert len(ref.state_dict()) == 375
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours.state_dict().items()}


@pytest.mark.parametrize("name", ["tiny", "four_stage", "three_stage", "sana"])
def test_config_translation_gives_diffusers_parameter_count(name):
    config = {**CONFIGS, "sana": SANA}[name]
    with torch.device("meta"):
        ref = AutoencoderDC(**config)
        ours = DCAE(dcae_config_from_diffusers(dict(ref.config)))   # the dict diffusers writes to config.json
    assert n_params(ours) == n_params(ref)
    assert ours.compression == ref.spatial_compression_ratio


def test_translation_of_reference_configs_equals_presets():
    assert dcae_config_from_diffusers(TINY) == DCAE_PRESETS["tiny"]
    assert dcae_config_from_diffusers(SANA) == DCAE_PRESETS["dc-ae-f32c32-sana-1.0"]


def test_small_preset_is_f32c32():
    cfg = DCAE_PRESETS["small"]
    assert (cfg.compression, cfg.latent_channels) == (32, 32)
    with torch.device("meta"):
        model = DCAE(cfg)
    x = torch.empty(1, 3, 64, 96, device="meta")
    assert model.encode(x).shape == (1, 32, 2, 3)
    assert model.decode(model.encode(x)).shape == (1, 3, 64, 96)


@pytest.mark.parametrize("field,value", [
    ("upsample_block_type", "pixel_shuffle"),
    ("downsample_block_type", "pixel_unshuffle"),
    ("decoder_norm_types", "batch_norm"),
    ("decoder_norm_types", ("rms_norm", "batch_norm")),
    ("decoder_act_fns", "relu"),
    ("encoder_out_shortcut", False),
    ("decoder_in_shortcut", False),
    ("decoder_conv_act_fn", "silu"),
    ("encoder_layers_per_block", (0, 1)),
    ("decoder_layers_per_block", (1, 0)),
    ("encoder_block_types", ("ResBlock", "AttnBlock")),
    ("decoder_block_out_channels", (8, 16)),
    ("decoder_block_types", "ResBlock"),
    ("encoder_qkv_multiscales", ((), (3,))),
])
def test_config_translation_rejects_unsupported_values(field, value):
    with pytest.raises(ValueError, match=field):
        dcae_config_from_diffusers({**TINY, field: value})


def test_config_translation_ignores_unknown_fields_with_a_warning():
    # diffusers ignores config keys it does not know; the weights must still fit the model exactly.
    with pytest.warns(UserWarning, match="some_future_option"):
        assert dcae_config_from_diffusers({**TINY, "some_future_option": 1}) == DCAE_PRESETS["tiny"]


def test_config_translation_uses_diffusers_defaults_for_missing_fields():
    config = {k: v for k, v in TINY.items() if k != "upsample_block_type"}   # diffusers default: pixel_shuffle
    with pytest.raises(ValueError, match="upsample_block_type"):
        dcae_config_from_diffusers(config)
    meta = {"_class_name": "AutoencoderDC", "_diffusers_version": "0.42.1"}
    assert dcae_config_from_diffusers({**TINY, **meta}) == DCAE_PRESETS["tiny"]


@pytest.mark.parametrize("changes,field", [
    (dict(widths=(8, 8, 8)), "encoder_depths"),
    (dict(attention_head_dim=3), "attention_head_dim"),
    (dict(widths=(8, 64)), "widths"),
    (dict(latent_channels=3), "latent_channels"),
    (dict(encoder_depths=(0, 1)), "encoder_depths"),
    (dict(qkv_multiscales=((5,), (5,))), "qkv_multiscales"),
    (dict(qkv_multiscales=((), (4,))), "qkv_multiscales"),
    (dict(scaling_factor=0.0), "scaling_factor"),
])
def test_config_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(DCAE_PRESETS["tiny"], **changes)


def test_config_accepts_json_lists():
    cfg = DCAEConfig(widths=[8, 8], encoder_depths=[1, 1], decoder_depths=[1, 1], vit_stages=[False, True],
                     qkv_multiscales=[[], [5]], latent_channels=4, attention_head_dim=2)
    assert cfg == DCAE_PRESETS["tiny"] and hash(cfg) == hash(DCAE_PRESETS["tiny"])


####################################################################################################################
# State-dict converters
####################################################################################################################

def test_diffusers_converter_names_missing_and_extra_keys():
    d = diffusers_model(TINY)
    cfg = DCAE_PRESETS["tiny"]
    sd = d.state_dict()
    missing = "encoder.down_blocks.1.0.attn.to_k.weight"
    with pytest.raises(KeyError, match=re.escape(missing)):
        dcae_from_diffusers({k: v for k, v in sd.items() if k != missing}, cfg)
    with pytest.raises(KeyError, match="encoder.extra.weight"):
        dcae_from_diffusers({**sd, "encoder.extra.weight": torch.zeros(1)}, cfg)
    dcae_from_diffusers(sd, cfg)
    assert len(sd) == len(d.state_dict())                   # the caller's dict is not consumed


def diffusers_to_original(dsd: dict) -> dict:
    """Inverse of the original -> diffusers map (interop §6.3), written from efficientvit's module tree
    (`models/efficientvit/dc_ae.py`, `models/nn/ops.py`): `ResidualBlock` adds `main.`, `OpSequential` adds
    `op_list.`, `ConvLayer` adds `conv.`/`norm.`; LiteMLA keeps one fused (3C, C, 1, 1) qkv conv."""
    top = {"encoder.conv_in.": "encoder.project_in.conv.",
           "encoder.conv_out.": "encoder.project_out.main.op_list.0.conv.",
           "decoder.conv_in.": "decoder.project_in.main.conv.",
           "decoder.norm_out.": "decoder.project_out.op_list.0.",
           "decoder.conv_out.": "decoder.project_out.op_list.2.conv."}
    inner = [(r"conv1\.", "main.conv1.conv."), (r"conv2\.weight", "main.conv2.conv.weight"),
             (r"norm\.", "main.conv2.norm."),
             (r"attn\.to_qkv_multiscale\.(\d+)\.proj_in\.", r"context_module.main.aggreg.\1.0."),
             (r"attn\.to_qkv_multiscale\.(\d+)\.proj_out\.", r"context_module.main.aggreg.\1.1."),
             (r"attn\.norm_out\.", "context_module.main.proj.norm."),
             (r"conv_out\.conv_inverted\.", "local_module.main.inverted_conv.conv."),
             (r"conv_out\.conv_depth\.", "local_module.main.depth_conv.conv."),
             (r"conv_out\.conv_point\.", "local_module.main.point_conv.conv."),
             (r"conv_out\.norm\.", "local_module.main.point_conv.norm.")]
    out, dsd = {}, dict(dsd)
    for key in list(dsd):
        if key not in dsd:
            continue
        prefix = next((p for p in top if key.startswith(p)), None)
        if prefix:
            out[top[prefix] + key[len(prefix):]] = dsd.pop(key)
            continue
        side, blocks, i, j, rest = re.fullmatch(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(\d+)\.(.*)",
                                                key).groups()
        head = f"{side}.stages.{i}.op_list.{j}."
        if rest.startswith("attn.to_") and rest[8] in "qkv" and rest[9] == ".":
            parts = [dsd.pop(f"{side}.{blocks}.{i}.{j}.attn.to_{n}.weight") for n in "qkv"]
            out[head + "context_module.main.qkv.conv.weight"] = torch.cat(parts)[:, :, None, None]
        elif rest == "attn.to_out.weight":
            out[head + "context_module.main.proj.conv.weight"] = dsd.pop(key)[:, :, None, None]
        elif rest.startswith("conv."):                       # down block (ConvLayer) / up block (InterpolateConv)
            out[head + ("main.conv." if side == "encoder" else "main.conv.conv.") + rest[5:]] = dsd.pop(key)
        else:
            for pattern, repl in inner:
                if re.match(pattern, rest):
                    out[head + re.sub(pattern, repl, rest, count=1)] = dsd.pop(key)
                    break
            else:
                raise AssertionError(f"no inverse rule for {key}")
    return out


@pytest.mark.parametrize("name", ["tiny", "four_stage"])
def test_original_checkpoint_round_trip(name):
    d = diffusers_model(CONFIGS[name])
    dsd = d.state_dict()
    original = diffusers_to_original(dsd)
    # The inverse above must be exactly what diffusers' own original -> diffusers converter undoes.
    back = convert_autoencoder_dc_checkpoint_to_diffusers(dict(original))
    assert back.keys() == dsd.keys() and all(torch.equal(back[k], dsd[k]) for k in dsd)

    cfg = dcae_config_from_diffusers(dict(d.config))
    m = DCAE(cfg).eval()
    m.load_state_dict(dcae_from_original(original, cfg), strict=True)
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert max_diff(m.encoder(x), d.encoder(x)) <= ATOL
        z = d.encoder(x)
        assert max_diff(m.decoder(z), d.decoder(z)) <= ATOL


def test_original_converter_names_missing_and_extra_keys():
    cfg = DCAE_PRESETS["tiny"]
    original = diffusers_to_original(diffusers_model(TINY).state_dict())
    missing = "encoder.stages.1.op_list.0.context_module.main.qkv.conv.weight"
    with pytest.raises(KeyError, match=re.escape(missing)):
        dcae_from_original({k: v for k, v in original.items() if k != missing}, cfg)
    with pytest.raises(KeyError, match="decoder.project_out.op_list.9.weight"):
        dcae_from_original({**original, "decoder.project_out.op_list.9.weight": torch.zeros(1)}, cfg)


def test_our_qkv_is_the_fused_original_layout():
    # The fused weight must be the original (3C, C, 1, 1) tensor itself, not a re-split [Q | K | V] layout.
    d = diffusers_model(TINY)
    cfg = DCAE_PRESETS["tiny"]
    original = diffusers_to_original(d.state_dict())
    ours = dcae_from_original(original, cfg)
    key = "encoder.stages.1.0.attn.qkv.weight"
    assert ours[key].shape == (24, 8, 1, 1)
    assert torch.equal(ours[key], original["encoder.stages.1.op_list.0.context_module.main.qkv.conv.weight"])
    assert torch.equal(ours[key], dcae_from_diffusers(d.state_dict(), cfg)[key])


####################################################################################################################
# Input checks
####################################################################################################################

def test_encode_and_decode_reject_bad_inputs():
    torch.manual_seed(0)
    m = DCAE(DCAE_PRESETS["tiny"]).eval()
    with pytest.raises(ValueError, match="height=5"):
        m.encode(torch.zeros(1, 3, 5, 4))
    with pytest.raises(ValueError, match="width=7"):
        m.encode(torch.zeros(1, 3, 4, 7))
    with pytest.raises(ValueError, match=r"encode: x has shape \(1, 4, 4, 4\)"):
        m.encode(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"decode: z has shape \(1, 3, 2, 2\)"):
        m.decode(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="decode: z"):
        m.decode(torch.zeros(4, 2, 2))


def test_decode_margin_decodes_a_replicated_border_and_crops_it(tmp_path):
    """decode_margin=m: the decode of z equals the plain decode of z with m replicated cells on each side, cropped
    by m * compression px; pixels far from the border (beyond the decoder's reach) equal the plain decode's; the
    setting survives save/load as a private key that diffusers' AutoencoderDC skips."""
    from sanaflow.hub import load_dcae, save_dcae
    torch.manual_seed(0)
    # ResBlocks only: a local decoder (an EfficientViT stage would let every pixel see the whole latent).
    cfg = dataclasses.replace(DCAE_PRESETS["tiny"], vit_stages=(False, False), qkv_multiscales=((), ()),
                              scaling_factor=0.5)
    plain = DCAE(cfg).eval()
    margin = DCAE(dataclasses.replace(cfg, decode_margin=2)).eval()
    margin.load_state_dict(plain.state_dict())
    z = torch.randn(2, 4, 16, 14)
    with torch.no_grad():
        ours = margin.decode(z)
        z_wide = torch.cat([z[:, :, :1]] * 2 + [z] + [z[:, :, -1:]] * 2, dim=2)
        z_wide = torch.cat([z_wide[..., :1]] * 2 + [z_wide] + [z_wide[..., -1:]] * 2, dim=3)  # (2, 4, 20, 18)
        expected = plain.decode(z_wide)[..., 4:-4, 4:-4]                # tiny compresses 2x: crop 2 * 2 px
        base = plain.decode(z)
    assert ours.shape == base.shape == (2, 3, 32, 28)
    torch.testing.assert_close(ours, expected)
    assert not torch.allclose(ours[..., 0, :], base[..., 0, :])        # the border changes ...
    torch.testing.assert_close(ours[..., 12:-12, 12:-12], base[..., 12:-12, 12:-12])   # ... the interior does not
    save_dcae(margin, tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["_sanaflow_decode_margin"] == 2
    assert load_dcae(tmp_path / "vae").cfg.decode_margin == 2
    AutoencoderDC.from_pretrained(tmp_path / "vae")                      # diffusers still loads the folder
    with pytest.raises(ValueError, match="decode_margin=-1"):
        dataclasses.replace(cfg, decode_margin=-1)
