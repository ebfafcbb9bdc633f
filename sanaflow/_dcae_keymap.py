"""State-dict key maps and config translation for the DC-AE: diffusers `AutoencoderDC` and original
mit-han-lab/efficientvit (NVlabs/Sana) checkpoints -> `sanaflow.dcae`.

Pure functions, no IO. Each converter pops every tensor it uses and fails on missing or leftover keys, so a
checkpoint for a different architecture never loads half-way. Unwrapping "model"/"module"/"state_dict" nesting
is the caller's job.

One table, `_key_table`, lists every tensor of our model with its diffusers name(s) and its original name
(spec: `diffusers-interop.md` §2.3 for diffusers, §6.3 for the original names; the original module tree is
efficientvit `models/efficientvit/dc_ae.py` + `models/nn/ops.py`, where `ResidualBlock` adds `main.`,
`OpSequential` adds `op_list.` and `ConvLayer` adds `conv.`/`norm.`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from sanaflow.dcae import DCAEConfig


class _Key(NamedTuple):
    ours: str
    diffusers: tuple[str, ...]      # several names are concatenated along dim 0 (to_q, to_k, to_v -> qkv)
    original: str
    linear: bool = False            # diffusers stores it as nn.Linear (out, in); ours is a 1x1 conv (out, in, 1, 1)


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


def _raise_on_mismatch(fn: str, missing: list[str], leftover: dict[str, Tensor]) -> None:
    problems = []
    if missing:
        problems.append(f"{len(missing)} expected keys missing: {missing[:10]}")
    if leftover:
        problems.append(f"{len(leftover)} unexpected keys not converted: {sorted(leftover)[:10]}")
    if problems:
        raise KeyError(f"{fn}: " + "; ".join(problems) + " (does the DCAEConfig match the checkpoint?)")


def dcae_from_diffusers(sd: dict[str, Tensor], cfg: DCAEConfig) -> dict[str, Tensor]:
    """diffusers `AutoencoderDC.state_dict()` -> `DCAE(cfg)` state dict.

    diffusers splits the fused qkv conv into three (C, C) Linear weights by taking thirds of the original weight
    (interop §6.3), so concatenating them restores the per-head interleaved [q, k, v] layout exactly.
    """
    sd, out, missing = dict(sd), {}, []
    for key in _key_table(cfg):
        if any(name not in sd for name in key.diffusers):
            missing += [name for name in key.diffusers if name not in sd]
            continue
        parts = [sd.pop(name) for name in key.diffusers]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        out[key.ours] = t[:, :, None, None] if key.linear else t            # (out, in) -> (out, in, 1, 1)
    _raise_on_mismatch("dcae_from_diffusers", missing, sd)
    return out


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
    _raise_on_mismatch("dcae_from_original", missing, sd)
    return out


####################################################################################################################
# diffusers vae/config.json -> DCAEConfig (interop §2.1)
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


def dcae_config_from_diffusers(config_json: dict) -> DCAEConfig:
    """Translate a diffusers `vae/config.json` dict; ValueError naming the field for anything SANA does not use."""
    unknown = sorted(k for k in config_json if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
    if unknown:
        raise ValueError(f"dcae_config_from_diffusers: unknown fields {unknown}; this AutoencoderDC version is "
                         f"not supported")
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config_json.items() if not k.startswith("_")}}
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
        attention_head_dim=c["attention_head_dim"], scaling_factor=float(c["scaling_factor"]))
