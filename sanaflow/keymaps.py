"""State-dict key maps and config translation: diffusers and original NVlabs / mit-han-lab checkpoints -> ours,
and ours -> diffusers (for writing diffusers folders).

Pure functions, no IO (loading and saving is `sanaflow.hub`). Each converter pops every tensor it uses and fails on
missing or leftover keys, so a checkpoint for a different architecture never loads half-way. Unwrapping
"model"/"module"/"state_dict" nesting is the caller's job.

Both directions of each diffusers map are read off one table (`_dit_key_table`, `_key_table`), so the writer can
never disagree with the loader about a name.

Linear DiT: our names (sanaflow/dit.py) follow NVlabs' closely; diffusers splits q/k/v and k/v, which we fuse.

DC-AE: one table,
`_key_table`, lists every tensor of our model with its diffusers name(s) and its original name
(spec: `diffusers-interop.md` §2.3 for diffusers, §6.3 for the original names; the original module tree is
efficientvit `models/efficientvit/dc_ae.py` + `models/nn/ops.py`, where `ResidualBlock` adds `main.`,
`OpSequential` adds `op_list.` and `ConvLayer` adds `conv.`/`norm.`).
"""

from __future__ import annotations

import math
import re
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from .dcae import DCAEConfig
from .dit import DiTConfig

StateDict = dict[str, Tensor]


####################################################################################################################
# Key tables, read in both directions
####################################################################################################################


class _Key(NamedTuple):
    ours: str
    diffusers: tuple[str, ...]      # several names are concatenated along dim 0 (to_q, to_k, to_v -> qkv)
    original: str = ""              # NVlabs / mit-han-lab name (DC-AE table only; the DiT's is dit_from_original)
    linear: bool = False            # diffusers stores it as nn.Linear (out, in); ours is a 1x1 conv (out, in, 1, 1)


def _raise_on_mismatch(fn: str, missing: list[str], leftover: dict[str, Tensor], config: str) -> None:
    problems = []
    if missing:
        problems.append(f"{len(missing)} expected keys missing: {missing[:10]}")
    if leftover:
        problems.append(f"{len(leftover)} unexpected keys not converted: {sorted(leftover)[:10]}")
    if problems:
        raise KeyError(f"{fn}: " + "; ".join(problems) + f" (does the {config} match the weights?)")


def _from_diffusers(sd: StateDict, table: list[_Key], fn: str, config: str) -> StateDict:
    """diffusers names -> ours by `table`: split tensors are concatenated, Linear weights become 1x1 convs."""
    sd, out, missing = dict(sd), {}, []
    for key in table:
        if any(name not in sd for name in key.diffusers):
            missing += [name for name in key.diffusers if name not in sd]
            continue
        parts = [sd.pop(name) for name in key.diffusers]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        out[key.ours] = t[:, :, None, None] if key.linear else t            # (out, in) -> (out, in, 1, 1)
    _raise_on_mismatch(fn, missing, sd, config)
    return out


def _to_diffusers(sd: StateDict, table: list[_Key], fn: str, config: str) -> StateDict:
    """Ours -> diffusers names by `table`, the exact inverse of `_from_diffusers`."""
    sd, out, missing = dict(sd), {}, []
    for key in table:
        if key.ours not in sd:
            missing.append(key.ours)
            continue
        t = sd.pop(key.ours)
        if key.linear:
            if t.ndim != 4 or t.shape[2:] != (1, 1):
                raise ValueError(f"{fn}: {key.ours} has shape {tuple(t.shape)}, expected a 1x1 conv (out, in, 1, 1)")
            t = t[:, :, 0, 0]                                               # (out, in, 1, 1) -> (out, in)
        n = len(key.diffusers)
        if n == 1:
            out[key.diffusers[0]] = t
            continue
        if t.shape[0] % n:
            raise ValueError(f"{fn}: {key.ours} has {t.shape[0]} rows, not divisible into {n} equal parts "
                             f"{list(key.diffusers)}")
        # Views, like every other output tensor here: chunks along dim 0 do not overlap, which safetensors accepts.
        for name, part in zip(key.diffusers, t.chunk(n, dim=0), strict=True):
            out[name] = part
    _raise_on_mismatch(fn, missing, sd, config)
    return out


####################################################################################################################
# Linear DiT (ours <-> diffusers, ours <- NVlabs). Ours: sanaflow/dit.py module names.
####################################################################################################################


def _dit_key_table(cfg: DiTConfig) -> list[_Key]:
    """Every tensor of our DiT with its diffusers SanaTransformer2DModel name(s) (interop §1.3)."""
    def key(ours: str, *diffusers: str) -> _Key:
        return _Key(ours, diffusers)

    wb = ("weight", "bias")
    keys = [key(f"patch_embed.{p}", f"patch_embed.proj.{p}") for p in wb]
    for i, name in ((0, "linear_1"), (2, "linear_2")):
        for p in wb:
            keys += [key(f"t_embed.{i}.{p}", f"time_embed.emb.timestep_embedder.{name}.{p}"),
                     key(f"y_proj.{i}.{p}", f"caption_projection.{name}.{p}")]
    keys += [key(f"t_block.1.{p}", f"time_embed.linear.{p}") for p in wb]
    keys.append(key("y_norm.weight", "caption_norm.weight"))
    for i in range(cfg.depth):
        s, d = f"transformer_blocks.{i}.", f"blocks.{i}."
        keys += [key(d + "scale_shift_table", s + "scale_shift_table"),
                 key(d + "attn.qkv.weight", *(f"{s}attn1.to_{n}.weight" for n in "qkv")),   # no bias (§1.1)
                 key(d + "ffn.point.weight", s + "ff.conv_point.weight")]
        for p in wb:
            keys += [key(f"{d}attn.proj.{p}", f"{s}attn1.to_out.0.{p}"),
                     key(f"{d}cross_attn.q.{p}", f"{s}attn2.to_q.{p}"),
                     key(f"{d}cross_attn.kv.{p}", f"{s}attn2.to_k.{p}", f"{s}attn2.to_v.{p}"),
                     key(f"{d}cross_attn.proj.{p}", f"{s}attn2.to_out.0.{p}"),
                     key(f"{d}ffn.inverted.{p}", f"{s}ff.conv_inverted.{p}"),
                     key(f"{d}ffn.depthwise.{p}", f"{s}ff.conv_depth.{p}")]
        if cfg.qk_norm:
            for a, b in (("attn1", "attn"), ("attn2", "cross_attn")):
                keys += [key(f"{d}{b}.q_norm.weight", f"{s}{a}.norm_q.weight"),
                         key(f"{d}{b}.k_norm.weight", f"{s}{a}.norm_k.weight")]
    keys.append(key("final_table", "scale_shift_table"))
    keys += [key(f"final_linear.{p}", f"proj_out.{p}") for p in wb]
    return keys


def dit_from_diffusers(sd: StateDict, cfg: DiTConfig) -> StateDict:
    """diffusers SanaTransformer2DModel state dict -> ours (interop §1.3). q/k/v are fused into one matmul."""
    return _from_diffusers(sd, _dit_key_table(cfg), "dit_from_diffusers", "DiTConfig")


def dit_to_diffusers(sd: StateDict, cfg: DiTConfig) -> StateDict:
    """Our DiT state dict -> diffusers SanaTransformer2DModel's (the inverse of `dit_from_diffusers`): the fused
    self-attention qkv splits into to_q/to_k/to_v, the cross-attention kv into to_k/to_v (rows [q | k | v])."""
    return _to_diffusers(sd, _dit_key_table(cfg), "dit_to_diffusers", "DiTConfig")


def _pop(sd: StateDict, key: str) -> Tensor:
    if key not in sd:
        raise KeyError(f"missing key {key!r}")
    return sd.pop(key)


def _check_empty(sd: StateDict, what: str) -> None:
    if sd:
        raise KeyError(f"{what}: {len(sd)} unexpected keys, e.g. {sorted(sd)[:8]}")


def dit_from_original(sd: StateDict, cfg: DiTConfig) -> StateDict:
    """NVlabs/Sana SanaMS state dict -> ours (sana-spec §1.13, interop §6.2). Our names follow NVlabs' closely."""
    sd, out = dict(sd), {}
    take = lambda k: _pop(sd, k)  # noqa: E731
    for buf in ("pos_embed", "y_embedder.y_embedding"):   # buffers: PE is recomputed, the null caption is unused
        sd.pop(buf, None)
    for p in ("weight", "bias"):
        out[f"patch_embed.{p}"] = take(f"x_embedder.proj.{p}")
        out[f"t_embed.0.{p}"], out[f"t_embed.2.{p}"] = take(f"t_embedder.mlp.0.{p}"), take(f"t_embedder.mlp.2.{p}")
        out[f"t_block.1.{p}"] = take(f"t_block.1.{p}")
        out[f"y_proj.0.{p}"], out[f"y_proj.2.{p}"] = take(f"y_embedder.y_proj.fc1.{p}"), take(f"y_embedder.y_proj.fc2.{p}")
        out[f"final_linear.{p}"] = take(f"final_layer.linear.{p}")
    out["y_norm.weight"] = take("attention_y_norm.weight")
    out["final_table"] = take("final_layer.scale_shift_table")
    for i in range(cfg.depth):
        s = d = f"blocks.{i}."
        out[d + "scale_shift_table"] = take(s + "scale_shift_table")
        out[d + "attn.qkv.weight"] = take(s + "attn.qkv.weight")
        for p in ("weight", "bias"):
            out[f"{d}attn.proj.{p}"] = take(f"{s}attn.proj.{p}")
            out[f"{d}cross_attn.q.{p}"] = take(f"{s}cross_attn.q_linear.{p}")
            out[f"{d}cross_attn.kv.{p}"] = take(f"{s}cross_attn.kv_linear.{p}")
            out[f"{d}cross_attn.proj.{p}"] = take(f"{s}cross_attn.proj.{p}")
            out[f"{d}ffn.inverted.{p}"] = take(f"{s}mlp.inverted_conv.conv.{p}")
            out[f"{d}ffn.depthwise.{p}"] = take(f"{s}mlp.depth_conv.conv.{p}")
        out[d + "ffn.point.weight"] = take(s + "mlp.point_conv.conv.weight")
        if cfg.qk_norm:
            for a in ("attn", "cross_attn"):
                out[f"{d}{a}.q_norm.weight"] = take(f"{s}{a}.q_norm.weight")
                out[f"{d}{a}.k_norm.weight"] = take(f"{s}{a}.k_norm.weight")
    _check_empty(sd, "dit_from_original")
    return out


def dit_config_from_diffusers(c: dict) -> DiTConfig:
    """transformer/config.json of SanaTransformer2DModel -> DiTConfig (interop §1.1). Defaults as diffusers'."""
    g = lambda k, default: default if c.get(k) is None else c[k]  # noqa: E731  (diffusers fills absent keys)
    width = g("num_attention_heads", 70) * g("attention_head_dim", 32)
    cross_heads, cross_dim = g("num_cross_attention_heads", 20), g("cross_attention_head_dim", 112)
    unsupported = {
        "guidance_embeds": (g("guidance_embeds", False), "Sana-Sprint guidance embedding is not supported"),
        "norm_elementwise_affine": (g("norm_elementwise_affine", False), "affine norm2 is used by no SANA model"),
        "attention_bias": (g("attention_bias", False), "SANA's self-attention q/k/v have no bias"),
        "cross_attention_dim": (c.get("cross_attention_dim", 2240) != width,
                                f"must equal the width {width} (the caption projection's output)"),
        "num_cross_attention_heads": (cross_heads * cross_dim != width,
                                      f"x cross_attention_head_dim={cross_dim} must equal the width {width}"),
        "qk_norm": (g("qk_norm", None) not in (None, "rms_norm_across_heads"), "only 'rms_norm_across_heads'"),
    }
    for key, (bad, why) in unsupported.items():
        if bad:
            raise ValueError(f"transformer config: {key}={c.get(key)!r} is not supported: {why}")
    in_ch = g("in_channels", 32)
    return DiTConfig(
        in_channels=in_ch, out_channels=g("out_channels", in_ch), width=width, depth=g("num_layers", 20),
        head_dim=g("attention_head_dim", 32), cross_heads=cross_heads, caption_channels=g("caption_channels", 2304),
        mlp_ratio=g("mlp_ratio", 2.5), patch_size=g("patch_size", 1), sample_size=g("sample_size", 32),
        pe_interpolation=c.get("interpolation_scale"), qk_norm=g("qk_norm", None) is not None,
        norm_eps=g("norm_eps", 1e-6), timestep_scale=g("timestep_scale", 1.0))


# diffusers' SanaLinearAttnProcessor2_0 hard-codes the linear-attention eps; no config field carries another one.
_DIFFUSERS_LINEAR_ATTN_EPS = 1e-15


def dit_config_to_diffusers(cfg: DiTConfig) -> dict:
    """DiTConfig -> every field of diffusers' SanaTransformer2DModel config (its kwargs and transformer/config.json,
    as diffusers writes it). ValueError for a setting diffusers cannot express: the file would load as another model.
    """
    if cfg.linear_attn_eps != _DIFFUSERS_LINEAR_ATTN_EPS:
        raise ValueError(f"linear_attn_eps={cfg.linear_attn_eps} cannot be written to a diffusers config: diffusers "
                         f"always uses {_DIFFUSERS_LINEAR_ATTN_EPS} (replace it in the DiTConfig to save anyway)")
    return dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_attention_heads=cfg.width // cfg.head_dim,
                attention_head_dim=cfg.head_dim, num_layers=cfg.depth, num_cross_attention_heads=cfg.cross_heads,
                cross_attention_head_dim=cfg.width // cfg.cross_heads, cross_attention_dim=cfg.width,
                caption_channels=cfg.caption_channels, mlp_ratio=cfg.mlp_ratio, sample_size=cfg.sample_size,
                patch_size=cfg.patch_size, interpolation_scale=cfg.pe_interpolation, norm_eps=cfg.norm_eps,
                qk_norm="rms_norm_across_heads" if cfg.qk_norm else None, timestep_scale=cfg.timestep_scale,
                # What SANA never changes, written out as diffusers does so that the file does not depend on
                # diffusers' defaults; guidance_embeds_scale is read only when guidance_embeds is on (Sprint).
                dropout=0.0, attention_bias=False, norm_elementwise_affine=False, guidance_embeds=False,
                guidance_embeds_scale=0.1)


# Cross-attention heads cannot be read off the weights (interop §6.2): take them from the official table.
_CROSS_HEADS_BY_WIDTH = {2240: 20, 1152: 16}
# PE cannot be read off the key set either; official rule by native latent size (sana-spec §1.9).
_PE_BY_SAMPLE_SIZE = {64: 1.0, 128: 2.0}


def dit_config_from_original(sd: StateDict, **overrides) -> DiTConfig:
    """Infer the DiTConfig of an NVlabs checkpoint from its tensor shapes (interop §6.2); `overrides` win."""
    try:
        w = sd["x_embedder.proj.weight"]                                        # (D, C, p, p)
        width, in_ch, p = w.shape[0], w.shape[1], w.shape[2]
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        hidden = sd["blocks.0.mlp.point_conv.conv.weight"].shape[1]
        caption = sd["y_embedder.y_proj.fc1.weight"].shape[1]
        out_ch = sd["final_layer.linear.weight"].shape[0] // (p * p)
    except (KeyError, ValueError) as e:
        raise KeyError(f"not an NVlabs SANA transformer checkpoint (missing {e})") from e
    if any(k.startswith("cfg_embedder.") for k in sd):
        raise ValueError("Sana-Sprint checkpoints (cfg_embedder.*) are not supported")
    sample = int(round(math.sqrt(sd["pos_embed"].shape[1]))) * p if "pos_embed" in sd else 32
    kw = dict(in_channels=in_ch, out_channels=out_ch, width=width, depth=depth, patch_size=p,
              cross_heads=_CROSS_HEADS_BY_WIDTH.get(width), caption_channels=caption, mlp_ratio=hidden / width,
              sample_size=sample, pe_interpolation=_PE_BY_SAMPLE_SIZE.get(sample),
              qk_norm="blocks.0.attn.q_norm.weight" in sd)
    kw.update(overrides)
    if kw["cross_heads"] is None:
        raise ValueError(f"width={width} is not an official SANA width; pass cross_heads=... explicitly")
    return DiTConfig(**kw)


####################################################################################################################
# DC-AE
####################################################################################################################


def _params(ours: str, diffusers: str, original: str, names=("weight", "bias")) -> list[_Key]:
    return [_Key(f"{ours}.{n}", (f"{diffusers}.{n}",), f"{original}.{n}") for n in names]


def _block_keys(cfg: DCAEConfig, stage: int, ours: str, diff: str, orig: str) -> list[_Key]:
    """One ResBlock or EfficientViTBlock; `orig` is the `…op_list.{j}` prefix."""
    if not cfg.vit_stages[stage]:
        return [*_params(f"{ours}.conv1", f"{diff}.conv1", f"{orig}.main.conv1.conv"),
                *_params(f"{ours}.conv2", f"{diff}.conv2", f"{orig}.main.conv2.conv", names=("weight",)),
                *_params(f"{ours}.norm", f"{diff}.norm", f"{orig}.main.conv2.norm")]
    att, ffn = f"{orig}.context_module.main", f"{orig}.local_module.main"
    keys = [_Key(f"{ours}.attn.qkv.weight", tuple(f"{diff}.attn.to_{n}.weight" for n in "qkv"),
                 f"{att}.qkv.conv.weight", linear=True)]
    for s in range(len(cfg.qkv_multiscales[stage])):
        a, d = f"{ours}.attn.aggreg.{s}", f"{diff}.attn.to_qkv_multiscale.{s}"
        keys += [_Key(f"{a}.depthwise.weight", (f"{d}.proj_in.weight",), f"{att}.aggreg.{s}.0.weight"),
                 _Key(f"{a}.grouped.weight", (f"{d}.proj_out.weight",), f"{att}.aggreg.{s}.1.weight")]
    keys += [_Key(f"{ours}.attn.proj.weight", (f"{diff}.attn.to_out.weight",), f"{att}.proj.conv.weight",
                  linear=True),
             *_params(f"{ours}.attn.norm", f"{diff}.attn.norm_out", f"{att}.proj.norm"),
             *_params(f"{ours}.ffn.inverted", f"{diff}.conv_out.conv_inverted", f"{ffn}.inverted_conv.conv"),
             *_params(f"{ours}.ffn.depthwise", f"{diff}.conv_out.conv_depth", f"{ffn}.depth_conv.conv"),
             *_params(f"{ours}.ffn.point", f"{diff}.conv_out.conv_point", f"{ffn}.point_conv.conv",
                      names=("weight",)),
             *_params(f"{ours}.ffn.norm", f"{diff}.conv_out.norm", f"{ffn}.point_conv.norm")]
    return keys


def _key_table(cfg: DCAEConfig) -> list[_Key]:
    n = len(cfg.widths)
    keys = _params("encoder.conv_in", "encoder.conv_in", "encoder.project_in.conv")
    for i in range(n):
        ours, diff, orig = f"encoder.stages.{i}", f"encoder.down_blocks.{i}", f"encoder.stages.{i}.op_list"
        for j in range(cfg.encoder_depths[i]):
            keys += _block_keys(cfg, i, f"{ours}.{j}", f"{diff}.{j}", f"{orig}.{j}")
        if i < n - 1:                                       # down block: ResidualBlock(ConvLayer, averaging)
            j = cfg.encoder_depths[i]
            keys += _params(f"{ours}.{j}.conv", f"{diff}.{j}.conv", f"{orig}.{j}.main.conv")
    keys += _params("encoder.conv_out", "encoder.conv_out", "encoder.project_out.main.op_list.0.conv")
    keys += _params("decoder.conv_in", "decoder.conv_in", "decoder.project_in.main.conv")
    for i in range(n):
        ours, diff, orig = f"decoder.stages.{i}", f"decoder.up_blocks.{i}", f"decoder.stages.{i}.op_list"
        first = 0
        if i < n - 1:                                       # up block: ResidualBlock(InterpolateConv, duplicating)
            keys += _params(f"{ours}.0.conv", f"{diff}.0.conv", f"{orig}.0.main.conv.conv")
            first = 1
        for j in range(first, first + cfg.decoder_depths[i]):
            keys += _block_keys(cfg, i, f"{ours}.{j}", f"{diff}.{j}", f"{orig}.{j}")
    keys += _params("decoder.norm_out", "decoder.norm_out", "decoder.project_out.op_list.0")
    keys += _params("decoder.conv_out", "decoder.conv_out", "decoder.project_out.op_list.2.conv")
    return keys


def dcae_from_diffusers(sd: dict[str, Tensor], cfg: DCAEConfig) -> dict[str, Tensor]:
    """diffusers `AutoencoderDC.state_dict()` -> `DCAE(cfg)` state dict.

    diffusers splits the fused qkv conv into three (C, C) Linear weights by taking thirds of the original weight
    (interop §6.3), so concatenating them restores the per-head interleaved [q, k, v] layout exactly.
    """
    return _from_diffusers(sd, _key_table(cfg), "dcae_from_diffusers", "DCAEConfig")


def dcae_to_diffusers(sd: dict[str, Tensor], cfg: DCAEConfig) -> dict[str, Tensor]:
    """`DCAE(cfg)` state dict -> diffusers `AutoencoderDC`'s (the inverse of `dcae_from_diffusers`): the fused qkv
    1x1 conv splits into three thirds, to_q/to_k/to_v, and 1x1 convs that diffusers keeps as Linear lose their
    spatial dims."""
    return _to_diffusers(sd, _key_table(cfg), "dcae_to_diffusers", "DCAEConfig")


def dcae_from_original(sd: dict[str, Tensor], cfg: DCAEConfig) -> dict[str, Tensor]:
    """Original mit-han-lab/efficientvit or NVlabs/Sana DC-AE state dict -> `DCAE(cfg)` state dict.

    Every tensor keeps its shape (our fused qkv and 1x1 proj convs use the original layout); only names change.
    """
    sd, out, missing = dict(sd), {}, []
    for key in _key_table(cfg):
        if key.original not in sd:
            missing.append(key.original)
            continue
        out[key.ours] = sd.pop(key.original)
    _raise_on_mismatch("dcae_from_original", missing, sd, "DCAEConfig")
    return out


####################################################################################################################
# diffusers vae/config.json <-> DCAEConfig (interop §2.1)
####################################################################################################################

# diffusers' constructor defaults, used for fields a config.json leaves out (as diffusers itself does).
_DIFFUSERS_DEFAULTS = {
    "in_channels": 3, "latent_channels": 32, "attention_head_dim": 32,
    "encoder_block_types": "ResBlock", "decoder_block_types": "ResBlock",
    "encoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "decoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "encoder_layers_per_block": (2, 2, 2, 3, 3, 3), "decoder_layers_per_block": (3, 3, 3, 3, 3, 3),
    "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "upsample_block_type": "pixel_shuffle", "downsample_block_type": "pixel_unshuffle",
    "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu",
    "encoder_out_shortcut": True, "decoder_in_shortcut": True, "decoder_conv_act_fn": "relu",
    "scaling_factor": 1.0,
}

# SANA's choices, the only ones DCAE builds: a per-stage field accepts the value or a list of it.
_REQUIRED = {
    "upsample_block_type": "interpolate", "downsample_block_type": "conv", "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu", "encoder_out_shortcut": True, "decoder_in_shortcut": True,
    "decoder_conv_act_fn": "relu",
}
_BLOCK_TYPES = {"ResBlock": False, "EfficientViTBlock": True}


def _per_stage(name: str, value, n: int) -> tuple:
    """diffusers accepts a string for 'every stage' or one entry per stage."""
    if isinstance(value, str):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"dcae_config_from_diffusers: {name}={list(value)} needs one entry per stage "
                         f"({n}, from encoder_block_out_channels)")
    return value


DECODE_MARGIN_KEY = "_sanaflow_decode_margin"       # DCAEConfig.decode_margin in vae/config.json


def dcae_config_from_diffusers(config_json: dict) -> DCAEConfig:
    """Translate a diffusers `vae/config.json` dict; ValueError naming the field for anything SANA does not use."""
    unknown = sorted(k for k in config_json if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
    if unknown:   # diffusers ignores unknown config keys too; the weights still have to fit exactly
        warnings.warn(f"dcae_config_from_diffusers: ignoring unknown fields {unknown}", stacklevel=2)
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config_json.items() if k in _DIFFUSERS_DEFAULTS}}
    margin = config_json.get(DECODE_MARGIN_KEY, 0)
    widths = tuple(c["encoder_block_out_channels"])
    n = len(widths)

    for name, required in _REQUIRED.items():
        for value in (_per_stage(name, c[name], n) if name in ("decoder_norm_types", "decoder_act_fns")
                      else (c[name],)):
            if value != required:
                raise ValueError(f"dcae_config_from_diffusers: {name}={c[name]!r} is not supported; "
                                 f"sanaflow builds only SANA's DC-AE ({name}={required!r})")
    if tuple(c["decoder_block_out_channels"]) != widths:
        raise ValueError(f"dcae_config_from_diffusers: decoder_block_out_channels={c['decoder_block_out_channels']}"
                         f" must equal encoder_block_out_channels={list(widths)}")

    kinds = {}
    for side in ("encoder", "decoder"):
        name = f"{side}_block_types"
        types = _per_stage(name, c[name], n)
        for t in types:
            if t not in _BLOCK_TYPES:
                raise ValueError(f"dcae_config_from_diffusers: {name} contains {t!r}; "
                                 f"supported: {sorted(_BLOCK_TYPES)}")
        vit = tuple(_BLOCK_TYPES[t] for t in types)
        name = f"{side}_qkv_multiscales"
        scales = _per_stage(name, c[name], n)
        # diffusers ignores the multiscales of ResBlock stages; drop them so both sides compare equal.
        kinds[side] = (vit, tuple(tuple(s) if v else () for s, v in zip(scales, vit)))
        name = f"{side}_layers_per_block"
        depths = _per_stage(name, c[name], n)
        if any(d < 1 for d in depths):
            raise ValueError(f"dcae_config_from_diffusers: {name}={list(depths)} is not supported; SANA's "
                             f"DC-AE has at least one block per stage (layers_per_block[0] > 0 wiring)")
    if kinds["encoder"] != kinds["decoder"]:
        raise ValueError(f"dcae_config_from_diffusers: encoder_block_types/encoder_qkv_multiscales "
                         f"{kinds['encoder']} must match decoder_block_types/decoder_qkv_multiscales "
                         f"{kinds['decoder']}")

    return DCAEConfig(
        in_channels=c["in_channels"], latent_channels=c["latent_channels"], widths=widths,
        encoder_depths=tuple(c["encoder_layers_per_block"]), decoder_depths=tuple(c["decoder_layers_per_block"]),
        vit_stages=kinds["encoder"][0], qkv_multiscales=kinds["encoder"][1],
        attention_head_dim=c["attention_head_dim"], scaling_factor=float(c["scaling_factor"]), decode_margin=margin)


def dcae_config_to_diffusers(cfg: DCAEConfig) -> dict:
    """DCAEConfig -> every field of diffusers' AutoencoderDC config (the inverse of `dcae_config_from_diffusers`),
    per-stage fields as lists, as diffusers writes vae/config.json."""
    types = ["EfficientViTBlock" if vit else "ResBlock" for vit in cfg.vit_stages]
    config = {
        "in_channels": cfg.in_channels, "latent_channels": cfg.latent_channels,
        "attention_head_dim": cfg.attention_head_dim, "scaling_factor": cfg.scaling_factor,
        **_REQUIRED,   # SANA's block, shortcut, norm and activation choices: the only DC-AE sanaflow builds
        # A private key (leading "_"): diffusers skips it and decodes without the margin.
        **({DECODE_MARGIN_KEY: cfg.decode_margin} if cfg.decode_margin else {}),
    }
    for side, depths in (("encoder", cfg.encoder_depths), ("decoder", cfg.decoder_depths)):
        config[f"{side}_block_types"] = list(types)
        config[f"{side}_block_out_channels"] = list(cfg.widths)
        config[f"{side}_layers_per_block"] = list(depths)
        config[f"{side}_qkv_multiscales"] = [list(k) for k in cfg.qkv_multiscales]
    return config
