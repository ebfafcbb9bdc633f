"""Official SANA weights from local paths: diffusers folders and original NVlabs / mit-han-lab files.

Foreign weights are converted here, at the edge, by explicit key maps (interop §1.3, §6.2, §6.3); the models
never know where their weights came from. Every converter pops the keys it uses and fails on leftovers, every
loader names the file it was reading when something is wrong, and nothing here unpickles code: safetensors, or
`torch.load(weights_only=True)` for `.pth`/`.bin`.
"""
from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .dcae import DCAE, DCAEConfig
from ._dcae_keymap import dcae_config_from_diffusers, dcae_from_diffusers, dcae_from_original
from .dit import DIT_PRESETS, DiT, DiTConfig

StateDict = dict[str, Tensor]


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be used; the message names the path and the keys."""


# ----------------------------------------------------------------------------------------------------------------
# Reading tensors


def read_state_dict(path: str | Path) -> StateDict:
    """One weights file -> flat CPU state dict. .safetensors, or .pth/.pt/.bin/.ckpt with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)   # refuses pickled code
    except pickle.UnpicklingError as e:   # weights_only refused an object: the file carries code or classes
        raise CheckpointError(f"{path}: refused to unpickle non-tensor objects (only plain weights load): {e}") from e
    except Exception as e:   # torch's unpickler raises KeyError, EOFError, RuntimeError... on corrupt bytes
        raise CheckpointError(f"{path}: cannot read weights (truncated or corrupt file?): "
                              f"{type(e).__name__}: {e}") from e
    # Training checkpoints nest the weights (NVlabs: "state_dict"; efficientvit: "model"/"module"; interop §6.1).
    while isinstance(sd, dict) and len(sd) and not any(isinstance(v, Tensor) for v in sd.values()):
        inner = next((sd[k] for k in ("state_dict", "model", "module") if isinstance(sd.get(k), dict)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (or one under 'state_dict'/'model'/'module')")
    prefix = "model.diffusion_model."     # single-file exports (diffusers single_file_utils)
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def read_diffusers_weights(folder: str | Path, stem: str = "diffusion_pytorch_model",
                           variant: str | None = None) -> StateDict:
    """The weights of one diffusers/transformers component folder (interop §5): single file or index + shards,
    optionally a variant ("fp16", "bf16"). With variant=None the plain files are used, or the only variant present."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"component folder not found: {folder}")
    if variant is None and not any((folder / f"{stem}{ext}").exists()
                                   for ext in (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")):
        found = sorted({m.group(1) for f in folder.iterdir()
                        if (m := re.match(rf"{re.escape(stem)}(?:\.safetensors(?:\.index)?)?\.(\w+)[.-]", f.name))
                        and m.group(1) not in ("safetensors", "bin", "index")})
        if len(found) == 1:
            variant = found[0]
        elif found:
            raise CheckpointError(f"{folder}: no plain {stem} weights; pick a variant from {found}")
    v = f".{variant}" if variant else ""
    for ext in ("safetensors", "bin"):
        # Index names: current "<stem>.safetensors.index.<v>.json", legacy "<stem>.safetensors.<v>.index.json".
        for index in (folder / f"{stem}.{ext}.index{v}.json", folder / f"{stem}.{ext}{v}.index.json"):
            if index.is_file():
                return _read_sharded(index)
        single = folder / f"{stem}{v}.{ext}"
        if single.is_file():
            return read_state_dict(single)
    raise FileNotFoundError(f"{folder}: no weights named {stem}{v}.safetensors (or an index of shards, or .bin)")


def _read_sharded(index: Path) -> StateDict:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e})") from e
    sd: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        part = read_state_dict(index.parent / shard)
        sd.update(part)
    missing = sorted(set(weight_map) - set(sd))
    if missing:
        raise CheckpointError(f"{index}: {len(missing)} keys listed in the index are in no shard, e.g. {missing[:5]}")
    return sd


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def load_into(model: nn.Module, sd: StateDict, source: str, dtype: torch.dtype | None = None) -> nn.Module:
    """Strictly load `sd` into a model built on the meta device; errors list missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(sd) & set(expected)) if sd[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing keys {missing[:8]}" if missing else "",
                 f"{len(unexpected)} unexpected keys {unexpected[:8]}" if unexpected else "",
                 f"{len(shapes)} shape mismatches {shapes[:8]}" if shapes else ""]
        raise CheckpointError(f"{source}: weights do not fit the model: " + "; ".join(p for p in parts if p))
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# Linear DiT key maps (ours <- diffusers, ours <- NVlabs). Ours: sanaflow/dit.py module names.


def _pop(sd: StateDict, key: str) -> Tensor:
    if key not in sd:
        raise KeyError(f"missing key {key!r}")
    return sd.pop(key)


def _check_empty(sd: StateDict, what: str) -> None:
    if sd:
        raise KeyError(f"{what}: {len(sd)} unexpected keys, e.g. {sorted(sd)[:8]}")


def dit_from_diffusers(sd: StateDict, cfg: DiTConfig) -> StateDict:
    """diffusers SanaTransformer2DModel state dict -> ours (interop §1.3). q/k/v are fused into one matmul."""
    sd, out = dict(sd), {}
    take = lambda k: _pop(sd, k)  # noqa: E731
    out["patch_embed.weight"], out["patch_embed.bias"] = take("patch_embed.proj.weight"), take("patch_embed.proj.bias")
    for i, name in ((0, "linear_1"), (2, "linear_2")):
        for p in ("weight", "bias"):
            out[f"t_embed.{i}.{p}"] = take(f"time_embed.emb.timestep_embedder.{name}.{p}")
            out[f"y_proj.{i}.{p}"] = take(f"caption_projection.{name}.{p}")
    out["t_block.1.weight"], out["t_block.1.bias"] = take("time_embed.linear.weight"), take("time_embed.linear.bias")
    out["y_norm.weight"] = take("caption_norm.weight")
    for i in range(cfg.depth):
        s, d = f"transformer_blocks.{i}.", f"blocks.{i}."
        out[d + "scale_shift_table"] = take(s + "scale_shift_table")
        out[d + "attn.qkv.weight"] = torch.cat([take(f"{s}attn1.to_{n}.weight") for n in "qkv"])
        out[d + "cross_attn.q.weight"], out[d + "cross_attn.q.bias"] = take(s + "attn2.to_q.weight"), take(s + "attn2.to_q.bias")
        for p in ("weight", "bias"):
            out[f"{d}attn.proj.{p}"] = take(f"{s}attn1.to_out.0.{p}")
            out[f"{d}cross_attn.kv.{p}"] = torch.cat([take(f"{s}attn2.to_k.{p}"), take(f"{s}attn2.to_v.{p}")])
            out[f"{d}cross_attn.proj.{p}"] = take(f"{s}attn2.to_out.0.{p}")
            out[f"{d}ffn.inverted.{p}"] = take(f"{s}ff.conv_inverted.{p}")
            out[f"{d}ffn.depthwise.{p}"] = take(f"{s}ff.conv_depth.{p}")
        out[d + "ffn.point.weight"] = take(s + "ff.conv_point.weight")
        if cfg.qk_norm:
            for a, b in (("attn1", "attn"), ("attn2", "cross_attn")):
                out[f"{d}{b}.q_norm.weight"] = take(f"{s}{a}.norm_q.weight")
                out[f"{d}{b}.k_norm.weight"] = take(f"{s}{a}.norm_k.weight")
    out["final_table"] = take("scale_shift_table")
    out["final_linear.weight"], out["final_linear.bias"] = take("proj_out.weight"), take("proj_out.bias")
    _check_empty(sd, "dit_from_diffusers")
    return out


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


def dit_config_to_diffusers(cfg: DiTConfig) -> dict:
    """DiTConfig -> the kwargs of diffusers' SanaTransformer2DModel (for writing diffusers folders and for tests)."""
    return dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_attention_heads=cfg.width // cfg.head_dim,
                attention_head_dim=cfg.head_dim, num_layers=cfg.depth, num_cross_attention_heads=cfg.cross_heads,
                cross_attention_head_dim=cfg.width // cfg.cross_heads, cross_attention_dim=cfg.width,
                caption_channels=cfg.caption_channels, mlp_ratio=cfg.mlp_ratio, sample_size=cfg.sample_size,
                patch_size=cfg.patch_size, interpolation_scale=cfg.pe_interpolation, norm_eps=cfg.norm_eps,
                qk_norm="rms_norm_across_heads" if cfg.qk_norm else None, timestep_scale=cfg.timestep_scale)


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


# ----------------------------------------------------------------------------------------------------------------
# Loaders


def _build(cls, cfg):
    with torch.device("meta"):            # no memory and no init for weights that are about to be replaced
        return cls(cfg)


def load_dit(folder: str | Path, dtype: torch.dtype = torch.float32, variant: str | None = None) -> DiT:
    """A diffusers `transformer/` folder (config.json + safetensors, sharded or not, any variant) -> our DiT."""
    folder = Path(folder)
    try:
        cfg = dit_config_from_diffusers(read_json(folder / "config.json"))
    except ValueError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from e
    sd = read_diffusers_weights(folder, variant=variant)
    try:
        sd = dit_from_diffusers(sd, cfg)
    except (KeyError, RuntimeError) as e:   # RuntimeError: q/k/v that cannot be fused (wrong shapes)
        raise CheckpointError(f"{folder}: transformer weights do not match config.json: {e.args[0]}") from e
    return load_into(_build(DiT, cfg), sd, str(folder), dtype)


def load_dcae(folder: str | Path, dtype: torch.dtype = torch.float32, variant: str | None = None) -> DCAE:
    """A diffusers `vae/` folder of AutoencoderDC -> our DCAE."""
    folder = Path(folder)
    try:
        cfg = dcae_config_from_diffusers(read_json(folder / "config.json"))
    except ValueError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from e
    sd = read_diffusers_weights(folder, variant=variant)
    try:
        sd = dcae_from_diffusers(sd, cfg)
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{folder}: autoencoder weights do not match config.json: {e.args[0]}") from e
    return load_into(_build(DCAE, cfg), sd, str(folder), dtype)


def load_original_dit(path: str | Path, dtype: torch.dtype = torch.float32, config: DiTConfig | str | None = None,
                      **overrides) -> DiT:
    """An NVlabs/Sana transformer checkpoint (.pth via weights_only, or .safetensors) -> our DiT.

    config: a DiTConfig, a preset name, or None to infer it from the tensor shapes (overrides apply then)."""
    sd = read_state_dict(path)
    try:
        cfg = DIT_PRESETS[config] if isinstance(config, str) else config or dit_config_from_original(sd, **overrides)
        sd = dit_from_original(sd, cfg)
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: {e.args[0] if e.args else e}") from e
    return load_into(_build(DiT, cfg), sd, str(path), dtype)


def load_original_dcae(path: str | Path, dtype: torch.dtype = torch.float32,
                       config: DCAEConfig | str = "dc-ae-f32c32-sana-1.0") -> DCAE:
    """A mit-han-lab DC-AE checkpoint (model.safetensors, or .pth) -> our DCAE (interop §6.3)."""
    from .dcae import DCAE_PRESETS
    cfg = DCAE_PRESETS[config] if isinstance(config, str) else config
    sd = read_state_dict(path)
    try:
        sd = dcae_from_original(sd, cfg)
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: {e.args[0]}") from e
    return load_into(_build(DCAE, cfg), sd, str(path), dtype)
