"""Linear DiT: SANA's denoiser (arXiv 2410.10629 §2.2, Fig. 5), read top to bottom.

    latent x (B, C, H, W) -> patch embed -> L x [linear self-attn, cross-attn to text, Mix-FFN] -> final layer -> v
    timestep -> sinusoid -> MLP -> AdaLN-single (one shared 6D projection, a learned table per block)
    text (B, L, 2304) -> caption MLP -> RMSNorm -> keys and values per block (once per caption: encode_text)

Numerics follow diffusers' `SanaTransformer2DModel` (docs/spec: ../shared/reference/diffusers-interop.md §1), so
official checkpoints give the same outputs; where NVlabs/Sana differs the difference is a config field.
The network's timestep is in SANA's units: 1000 * sigma (sana-spec §1.11); the flow convention t in [0, 1]
is mapped to it by the caller (`sanaflow.pipeline`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int = 32               # DC-AE f32c32 latent channels
    out_channels: int = 32              # = in_channels: the velocity (no learned sigma)
    width: int = 1152                   # D
    depth: int = 28
    head_dim: int = 32                  # linear self-attention head size; heads = D / head_dim
    cross_heads: int = 16               # softmax cross-attention heads; head size = D / cross_heads
    caption_channels: int = 2304        # text-encoder width (Gemma-2-2B)
    mlp_ratio: float = 2.5              # Mix-FFN hidden = int(mlp_ratio * D)
    patch_size: int = 1
    sample_size: int = 32               # latent side at the native resolution (PE base size, resolution bins)
    pe_interpolation: float | None = None  # None: NoPE (512/1024 models); 1.0 for 2K, 2.0 for 4K (sana-spec §1.9)
    qk_norm: bool = False               # RMSNorm over D on q, k (SANA-1.5); off for SANA 1.0
    linear_attn_eps: float = 1e-15      # diffusers; NVlabs' SanaMSBlock uses 1e-8 (sana-spec §1.6)
    norm_eps: float = 1e-6              # block LayerNorms
    timestep_scale: float = 1.0         # multiplies the timestep given by the pipeline (Sprint teachers; 1.0 for SANA)

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "width", "depth", "head_dim", "cross_heads",
                     "caption_channels", "patch_size", "sample_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiTConfig: {name}={getattr(self, name)} must be >= 1")
        if self.width % self.head_dim or self.width % self.cross_heads:
            raise ValueError(f"DiTConfig: width={self.width} must be divisible by head_dim={self.head_dim} "
                             f"and cross_heads={self.cross_heads}")
        if self.pe_interpolation is not None and (self.width % 4 or self.pe_interpolation <= 0):
            raise ValueError(f"DiTConfig: pe_interpolation={self.pe_interpolation} needs width % 4 == 0 "
                             f"(width={self.width}) and a positive scale")
        if self.mlp_ratio <= 0:
            raise ValueError(f"DiTConfig: mlp_ratio={self.mlp_ratio} must be > 0")

    @property
    def ffn_hidden(self) -> int:
        return int(self.mlp_ratio * self.width)


_SANA_600M = DiTConfig(width=1152, depth=28, cross_heads=16)            # 36 linear heads, cross head 72
_SANA_1600M = DiTConfig(width=2240, depth=20, cross_heads=20)           # 70 linear heads, cross head 112
DIT_PRESETS = {
    # Official SANA 1.0 (scripts/convert_sana_to_diffusers.py; sana-spec §6.1-6.2). sample_size = image / 32.
    "sana-600m-512":   replace(_SANA_600M, sample_size=16),
    "sana-600m-1024":  _SANA_600M,
    "sana-1600m-512":  replace(_SANA_1600M, sample_size=16),
    "sana-1600m-1024": _SANA_1600M,
    "sana-1600m-2k":   replace(_SANA_1600M, sample_size=64, pe_interpolation=1.0),
    "sana-1600m-4k":   replace(_SANA_1600M, sample_size=128, pe_interpolation=2.0),
    "sana-1.5-1600m":  replace(_SANA_1600M, qk_norm=True),
    "sana-1.5-4800m":  replace(_SANA_1600M, depth=60, qk_norm=True),
    # CPU-sized models (tests, the bundled model).
    "tiny":  DiTConfig(in_channels=4, out_channels=4, width=16, depth=2, head_dim=4, cross_heads=2,
                       caption_channels=8, sample_size=8),
    "small": DiTConfig(width=256, depth=8, head_dim=32, cross_heads=4, caption_channels=256, sample_size=8),
}


# ----------------------------------------------------------------------------------------------------------------
# Embeddings


def timestep_sinusoid(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """[cos, sin] features of t (B,) -> (B, dim), fp32 (sana-spec §1.3; diffusers Timesteps(flip_sin_to_cos=True))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                                     # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)                # (B, dim)


def sincos_pos_embed_2d(width: int, h: int, w: int, base: int, interpolation: float, device=None) -> Tensor:
    """Fixed 2-D sincos PE of the 2K/4K models for an h x w token grid -> (1, h*w, width), fp32 (sana-spec §1.9).

    Positions are rescaled to the native grid (base tokens per side) and divided by the interpolation scale,
    so a 4K model (scale 2) sees the 2K position range. The first half of the channels encodes x (the column).
    """
    gy = torch.arange(h, dtype=torch.float32, device=device) / (h / base) / interpolation    # (h,)
    gx = torch.arange(w, dtype=torch.float32, device=device) / (w / base) / interpolation    # (w,)
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64, device=device) / (width / 4))

    def embed(pos: Tensor) -> Tensor:                                           # (n,) -> (n, width/2), fp64
        out = torch.outer(pos.double(), omega)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=-1)

    ex = embed(gx)[None, :, :].expand(h, w, -1)                                 # (h, w, width/2) column code
    ey = embed(gy)[:, None, :].expand(h, w, -1)                                 # (h, w, width/2) row code
    return torch.cat([ex, ey], dim=-1).reshape(1, h * w, width).float()        # (1, N, width)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a weight, statistics in fp32 (diffusers RMSNorm; sana-spec §1.4)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)    # promoted to fp32
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)     # diffusers casts before the weight (interop §1.11)
        return x * self.weight


# ----------------------------------------------------------------------------------------------------------------
# The three token mixers of a block


class LinearAttention(nn.Module):
    """ReLU linear self-attention (paper Eq. 1): O(N d^2) per head instead of O(N^2 d).

    out_i = sum_j v_j relu(k_j).relu(q_i) / sum_j relu(k_j).relu(q_i). Appending a row of ones to v makes one
    matmul give numerator and normaliser (the padded-V trick, sana-spec §1.6). The sums run in fp32: in half
    precision they overflow or lose the normaliser, and the division is where that shows.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads, self.eps = cfg.width // cfg.head_dim, cfg.linear_attn_eps
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)   # one matmul; rows [q | k | v] as in NVlabs
        self.q_norm = RMSNorm(cfg.width) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.width) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:                                     # x: (B, N, D)
        B, N, D = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)                                  # 3 x (B, N, D)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (z.view(B, N, self.heads, -1).transpose(1, 2) for z in (q, k, v))   # (B, h, N, d)
        q, k, v = F.relu(q).float(), F.relu(k).float(), v.float()
        v = F.pad(v, (0, 1), value=1.0)                                         # (B, h, N, d+1)
        with torch.autocast(x.device.type, enabled=False):                      # fp32 even in mixed precision (§4.10)
            kv = k.transpose(-1, -2) @ v                                        # (B, h, d, d+1): sum over tokens
            out = q @ kv                                                        # (B, h, N, d+1)
        out = out[..., :-1] / (out[..., -1:] + self.eps)                        # (B, h, N, d)
        out = self.proj(out.transpose(1, 2).reshape(B, N, D).to(x.dtype))       # (B, N, D)
        if out.dtype == torch.float16:
            out = out.clamp(-65504, 65504)   # fp16 overflow guard, as diffusers and NVlabs (interop §8.1)
        return out


class CrossAttention(nn.Module):
    """Softmax attention from image tokens to text tokens; padding keys get a -10000 bias (sana-spec §1.7)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads = cfg.cross_heads
        self.q = nn.Linear(cfg.width, cfg.width)
        self.kv = nn.Linear(cfg.width, 2 * cfg.width)      # rows [k | v], as NVlabs' kv_linear
        self.q_norm = RMSNorm(cfg.width) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.width) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.width, cfg.width)

    def caption_kv(self, y: Tensor) -> tuple[Tensor, Tensor]:                 # y: (B, L, D)
        """Keys and values of the caption tokens: they depend on the caption alone (see DiT.encode_text)."""
        B, L, D = y.shape
        k, v = self.kv(y).chunk(2, dim=-1)                                      # 2 x (B, L, D)
        k = self.k_norm(k)
        return tuple(z.view(B, L, self.heads, D // self.heads).transpose(1, 2) for z in (k, v))  # (B, h, L, d)

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], bias: Tensor | None) -> Tensor:   # x: (B, N, D)
        B, N, D = x.shape
        q = self.q_norm(self.q(x)).view(B, N, self.heads, D // self.heads).transpose(1, 2)   # (B, h, N, d)
        out = F.scaled_dot_product_attention(q, *kv, attn_mask=bias)            # (B, h, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))                  # (B, N, D)


class MixFFN(nn.Module):
    """GLUMBConv: 1x1 expand + SiLU, 3x3 depthwise conv, GLU gate, 1x1 project (sana-spec §1.8).

    The zero-padded 3x3 depthwise conv lets each token see its neighbours; it is what lets SANA drop positional
    embeddings (arXiv 2410.10629 §2.2, Mix-FFN and NoPE). The convs run on a channels-last view of the tokens
    (B, N, D) and both 1x1 convs as matmuls, so no NCHW transpose is ever copied (benchmarks/dit_speed.py).
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        hidden = cfg.ffn_hidden
        self.inverted = nn.Conv2d(cfg.width, 2 * hidden, 1)
        self.depthwise = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.point = nn.Conv2d(hidden, cfg.width, 1, bias=False)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:               # x: (B, N, D)
        B, N, _ = x.shape
        h = F.silu(F.linear(x, self.inverted.weight.flatten(1), self.inverted.bias))   # (B, N, 2F)
        h = self.depthwise(h.reshape(B, *hw, -1).permute(0, 3, 1, 2))           # (B, 2F, H, W) channels-last view
        h, gate = h.permute(0, 2, 3, 1).reshape(B, N, -1).chunk(2, dim=-1)     # 2 x (B, N, F), no copy
        return F.linear(h * F.silu(gate), self.point.weight.flatten(1))         # (B, N, D)


# ----------------------------------------------------------------------------------------------------------------
# Block, final layer, model


class Block(nn.Module):
    """SanaMSBlock (sana-spec §1.5): gated, modulated linear attention; plain cross-attention; gated Mix-FFN."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=cfg.norm_eps)
        self.attn = LinearAttention(cfg)
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=cfg.norm_eps)
        self.ffn = MixFFN(cfg)
        # randn(6, D) / sqrt(D) as NVlabs, written as one factory call: on the meta device (hub loaders) an
        # arithmetic op would import torch's Python meta kernels, ~2 s of every process start (generate_speed.py).
        self.scale_shift_table = nn.Parameter(torch.normal(0.0, cfg.width**-0.5, (6, cfg.width)))

    def forward(self, x: Tensor, y: Tensor, bias: Tensor | None, t6: Tensor, hw: tuple[int, int],
                kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        # AdaLN-single: one shared projection t6 (B, 6, D) plus this block's own learned table.
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.scale_shift_table[None] + t6).chunk(6, dim=1)  # (B, 1, D)
        x = x + gate1 * self.attn((self.norm1(x) * (1 + scale1) + shift1).to(x.dtype))
        # Keys and values from the caption here (training: FSDP gathers this block's weights for its forward only),
        # or precomputed once per image by a sampler (DiT.encode_text(..., cache_kv=True)).
        kv = self.cross_attn.caption_kv(y) if kv is None else kv
        x = x + self.cross_attn(x, kv, bias)                # no norm, no gate (same in NVlabs and diffusers)
        return x + gate2 * self.ffn(self.norm2(x) * (1 + scale2) + shift2, hw)


class TextContext(NamedTuple):
    y: Tensor                           # (B, L, D) the projected, normalised caption
    bias: Tensor | None                 # (B, 1, 1, L) additive attention bias, -10000 on padding
    kv: list | None = None              # per block: the caption's keys and values, each (B, heads, L, D / heads)


class DiT(nn.Module):
    """SANA linear DiT. forward(x (B, C, H, W), timestep (B,) in 1000*sigma units, text (B, L, C_txt), mask (B, L))."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.width, cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_channels, D, kernel_size=p, stride=p)
        self.t_embed = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))                # AdaLN-single
        self.y_proj = nn.Sequential(nn.Linear(cfg.caption_channels, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.y_norm = RMSNorm(D)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_table = nn.Parameter(torch.normal(0.0, D**-0.5, (2, D)))     # randn / sqrt(D), see Block
        self.final_linear = nn.Linear(D, p * p * cfg.out_channels)
        self.grad_checkpointing = False     # per-block activation checkpointing while training (sana-spec §4.11)

    def init_weights(self, y_norm_scale: float = 0.01) -> None:
        """Training-from-scratch init of NVlabs SanaMS.initialize (sana-spec §1.12): no zero-init anywhere.
        `y_norm_scale` is the caption RMSNorm's initial scale: SANA's 0.01 (§2.3) tames Gemma-2-2B's large
        features; for a small encoder with unit-RMS features it keeps cross-attention near-uniform for thousands
        of steps (docs/bundled-model.md), and 1.0 serves better."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for lin in (self.t_embed[0], self.t_embed[2], self.t_block[1], self.y_proj[0], self.y_proj[2]):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.constant_(self.y_norm.weight, y_norm_scale)   # "small learnable scale factor (e.g. 0.01)", §2.3

    def pos_embed(self, h: int, w: int, device) -> Tensor | None:
        cfg = self.cfg
        if cfg.pe_interpolation is None:
            return None
        return sincos_pos_embed_2d(cfg.width, h, w, cfg.sample_size // cfg.patch_size, cfg.pe_interpolation, device)

    def forward(self, x: Tensor, timestep: Tensor, text: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.denoise(x, timestep, self.encode_text(text, mask))

    def encode_text(self, text: Tensor, mask: Tensor | None = None, cache_kv: bool = False) -> TextContext:
        """What the blocks need from the caption (B, L, C_txt). cache_kv: also every block's keys and values, which
        a sampler then computes once per image instead of once per step."""
        if text.ndim != 3 or text.shape[2] != self.cfg.caption_channels:
            raise ValueError(f"DiT: text of shape {tuple(text.shape)} must be (B, L, {self.cfg.caption_channels})")
        y = self.y_norm(self.y_proj(text))                                     # (B, L, D)
        bias = None
        if mask is not None:   # keep 1 / drop 0 -> additive bias (diffusers and NVlabs without xformers)
            bias = ((1 - mask.to(y.dtype)) * -10000.0)[:, None, None, :]       # (B, 1, 1, L)
        kv = [block.cross_attn.caption_kv(y) for block in self.blocks] if cache_kv else None
        return TextContext(y, bias, kv)

    def denoise(self, x: Tensor, timestep: Tensor, ctx: TextContext) -> Tensor:
        """The velocity for latents x (B, C, H, W) at `timestep` (B,), given encode_text's context of B captions."""
        cfg, p = self.cfg, self.cfg.patch_size
        B, C, H, W = x.shape
        if C != cfg.in_channels or H % p or W % p:
            raise ValueError(f"DiT: x of shape {tuple(x.shape)} needs {cfg.in_channels} channels and H, W "
                             f"divisible by patch_size={p}")
        if ctx.y.shape[0] != B:
            raise ValueError(f"DiT: {ctx.y.shape[0]} captions for a batch of {B} latents")
        h, w = H // p, W // p
        # contiguous: a transposed view would make every residual add, norm and matmul of every block copy.
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2).contiguous()   # (B, N, D), row-major
        pe = self.pos_embed(h, w, x.device)
        if pe is not None:
            tokens = (tokens + pe).to(tokens.dtype)
        t_emb = self.t_embed(timestep_sinusoid(timestep.expand(B)).to(tokens.dtype))   # (B, D)
        t6 = self.t_block(t_emb).view(B, 6, -1)                                # (B, 6, D)
        for i, block in enumerate(self.blocks):
            kv = ctx.kv[i] if ctx.kv is not None else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, ctx.y, ctx.bias, t6, (h, w), kv, use_reentrant=False)
            else:
                tokens = block(tokens, ctx.y, ctx.bias, t6, (h, w), kv)
        shift, scale = (self.final_table[None] + t_emb[:, None]).chunk(2, dim=1)   # (B, 1, D): t_emb, not t6
        out = self.final_linear(self.final_norm(tokens) * (1 + scale) + shift)     # (B, N, p*p*C_out)
        out = out.view(B, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)           # (B, C_out, h, p, w, p)
        return out.reshape(B, -1, H, W)                                        # (B, C_out, H, W)
