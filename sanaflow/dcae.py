"""DC-AE, the deep-compression autoencoder SANA uses (arXiv 2410.10733; SANA arXiv 2410.10629 §2.1).

An f32c32 DC-AE maps a (B, 3, H, W) image in [-1, 1] to a (B, 32, H/32, W/32) latent. Encoder and decoder are
stacks of stages, one per resolution: ResBlocks at high resolution, EfficientViT blocks (multi-scale ReLU linear
attention + GLU MBConv) at low resolution. Every change of resolution or width is a residual block whose shortcut
is a parameter-free space<->channel reshuffle, which is what lets the autoencoder compress 32x without losing
reconstruction quality (DC-AE paper, "Residual Autoencoding").

Spec: docs `sana-spec.md` §2 (architecture), `diffusers-interop.md` §2 (diffusers' AutoencoderDC, which this
file matches to float rounding). Foreign state dicts are converted by `sanaflow.keymaps`.

Module names (state-dict keys), stage i has width widths[i] and runs at 1/2^i of the image resolution:
    encoder.conv_in                          3x3 conv, image -> widths[0]
    encoder.stages.{i}.{j}                   j < encoder_depths[i]: ResBlock or EfficientViTBlock;
                                             j = encoder_depths[i] (all but the last stage): DownBlock
    encoder.conv_out                         3x3 conv, widths[-1] -> latent (+ channel-averaging shortcut)
    decoder.conv_in                          3x3 conv, latent -> widths[-1] (+ channel-duplicating shortcut)
    decoder.stages.{i}.0                     UpBlock widths[i+1] -> widths[i] (all but the last stage), then blocks
    decoder.norm_out, decoder.conv_out       RMSNorm2d -> ReLU -> 3x3 conv, widths[0] -> image
Decoder stages are indexed by resolution like the encoder's and run from the last to the first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


####################################################################################################################
# Config and presets
####################################################################################################################

@dataclass(frozen=True)
class DCAEConfig:
    in_channels: int = 3                                    # image channels (RGB in [-1, 1])
    latent_channels: int = 32                               # C_lat
    widths: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)          # channels per stage
    encoder_depths: tuple[int, ...] = (2, 2, 2, 3, 3, 3)                 # blocks per encoder stage
    decoder_depths: tuple[int, ...] = (3, 3, 3, 3, 3, 3)                 # blocks per decoder stage
    vit_stages: tuple[bool, ...] = (False, False, False, True, True, True)  # EfficientViT (True) or ResBlock
    qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))  # aggregation kernels, ViT only
    attention_head_dim: int = 32                            # d; heads = width / d
    scaling_factor: float = 0.41407                         # diffusion latent = Enc(x) * scaling_factor
    # Latent cells replicated around z before decoding; the extra margin * compression px per side are cropped off
    # (see `DCAE.decode`). 0 is diffusers' decode. Not a diffusers field: stored as "_sanaflow_decode_margin".
    decode_margin: int = 0

    def __post_init__(self):
        # JSON round trips give lists; store tuples so the config stays hashable and compares equal.
        for name in ("widths", "encoder_depths", "decoder_depths", "vit_stages"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "qkv_multiscales", tuple(tuple(k) for k in self.qkv_multiscales))

        n = len(self.widths)
        if n < 1:
            raise ValueError("DCAEConfig: widths=() must name at least one stage")
        for name in ("encoder_depths", "decoder_depths", "vit_stages", "qkv_multiscales"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"DCAEConfig: {name}={getattr(self, name)} must have one entry per stage "
                                 f"(len(widths)={n})")
        for name in ("in_channels", "latent_channels", "attention_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"DCAEConfig: {name}={getattr(self, name)} must be >= 1")
        if isinstance(self.decode_margin, bool) or not isinstance(self.decode_margin, int) or self.decode_margin < 0:
            raise ValueError(f"DCAEConfig: decode_margin={self.decode_margin!r} must be an int >= 0")
        if not (math.isfinite(self.scaling_factor) and self.scaling_factor > 0):
            raise ValueError(f"DCAEConfig: scaling_factor={self.scaling_factor} must be a positive finite number")
        for name in ("widths", "encoder_depths", "decoder_depths"):
            # depth 0 would change the wiring (no conv_in / down block); SANA never uses it.
            if any(v < 1 for v in getattr(self, name)):
                raise ValueError(f"DCAEConfig: {name}={getattr(self, name)} entries must all be >= 1")
        for i, (w, vit, scales) in enumerate(zip(self.widths, self.vit_stages, self.qkv_multiscales)):
            if vit and w % self.attention_head_dim:
                raise ValueError(f"DCAEConfig: widths[{i}]={w} must be divisible by "
                                 f"attention_head_dim={self.attention_head_dim} (EfficientViT stage)")
            if not vit and scales:
                raise ValueError(f"DCAEConfig: qkv_multiscales[{i}]={scales} must be () for a ResBlock stage")
            if any(k < 1 or k % 2 == 0 for k in scales):
                raise ValueError(f"DCAEConfig: qkv_multiscales[{i}]={scales} kernels must be odd and >= 1")
        for i in range(n - 1):
            # The down shortcut averages 4*w_i pixel-unshuffled channels in groups of 4*w_i/w_{i+1}; the up
            # shortcut duplicates each of w_{i+1} channels 4*w_i/w_{i+1} times (spec §2.4).
            if (4 * self.widths[i]) % self.widths[i + 1]:
                raise ValueError(f"DCAEConfig: widths[{i + 1}]={self.widths[i + 1]} must divide "
                                 f"4 * widths[{i}]={4 * self.widths[i]} (space-to-channel shortcut)")
        if self.widths[-1] % self.latent_channels:
            raise ValueError(f"DCAEConfig: latent_channels={self.latent_channels} must divide "
                             f"widths[-1]={self.widths[-1]} (encoder-output / decoder-input shortcuts)")

    @property
    def compression(self) -> int:
        return 2 ** (len(self.widths) - 1)                  # one stride-2 down block between stages


DCAE_PRESETS = {
    # mit-han-lab/efficientvit `dc_ae_f32c32("dc-ae-f32c32-sana-1.0")`; 312,250,275 parameters (spec §2.5).
    "dc-ae-f32c32-sana-1.0": DCAEConfig(),
    # Used by diffusers' SANA conversion and Sprint; assumed to share the 1.0 architecture (interop §2.1).
    "dc-ae-f32c32-sana-1.1": DCAEConfig(),
    # diffusers' own AutoencoderDC test config (interop §7.1): 2 stages of width 8, 2x compression.
    "tiny": DCAEConfig(latent_channels=4, widths=(8, 8), encoder_depths=(1, 1), decoder_depths=(1, 1),
                       vit_stages=(False, True), qkv_multiscales=((), (5,)), attention_head_dim=2),
    # A CPU-sized f32c32 model for training from scratch. scaling_factor is a placeholder until it is measured
    # as 1 / std of the trained encoder's latents.
    "small": DCAEConfig(widths=(16, 32, 64, 64, 128, 128), encoder_depths=(1, 1, 1, 2, 2, 2),
                        decoder_depths=(1, 1, 1, 2, 2, 2), scaling_factor=1.0),
}


####################################################################################################################
# Blocks (spec §2.3)
####################################################################################################################

class RMSNorm2d(nn.Module):
    """RMS norm over channels at each pixel, with weight and bias (efficientvit `TritonRMSNorm2d`)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:                                  # x: (B, C, H, W)
        x32 = x.float()                                                     # statistics in fp32 for bf16 safety
        y = (x32 * torch.rsqrt(x32.square().mean(1, keepdim=True) + self.eps)).to(x.dtype)
        # Affine after the cast back, in the input dtype, rounding after each op as diffusers' RMSNorm does: a
        # fused addcmul is ~25% faster on CPU but differs by one bf16 ulp, which the attention normaliser
        # amplifies to visible differences against diffusers downstream.
        return y * self.weight.to(x.dtype)[:, None, None] + self.bias.to(x.dtype)[:, None, None]


def conv3x3(c_in: int, c_out: int, bias: bool = True, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class ResBlock(nn.Module):
    """x + Norm(Conv(SiLU(Conv(x)))): the high-resolution stages, where attention would be too costly."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = conv3x3(width, width)
        self.conv2 = conv3x3(width, width, bias=False)      # the norm's bias follows
        self.norm = RMSNorm2d(width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.norm(self.conv2(F.silu(self.conv1(x))))


class MultiScaleAggregation(nn.Module):
    """Depthwise kxk conv then a per-(head, q/k/v) 1x1 conv: q, k, v gathered over a kxk neighbourhood, which
    gives each extra head a local receptive field (EfficientViT, arXiv 2205.14756, multi-scale tokens)."""

    def __init__(self, channels: int, groups: int, kernel: int):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False)
        self.grouped = nn.Conv2d(channels, channels, 1, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.grouped(self.depthwise(x))


class LiteMLA(nn.Module):
    """Multi-scale ReLU linear attention with residual: x + Norm(Proj(Attn(qkv(x), agg(qkv(x)))))."""

    def __init__(self, width: int, head_dim: int, scales: tuple[int, ...], eps: float = 1e-15):
        super().__init__()
        heads = width // head_dim
        self.head_dim, self.eps = head_dim, eps
        # One fused 1x1 conv, channels per head interleaved as [q(d), k(d), v(d)] (spec §2.3 and §8.14): the
        # mit-han-lab/NVlabs layout, so original checkpoints load without reshuffling.
        self.qkv = nn.Conv2d(width, 3 * width, 1, bias=False)
        self.aggreg = nn.ModuleList(MultiScaleAggregation(3 * width, 3 * heads, k) for k in scales)
        self.proj = nn.Conv2d(width * (1 + len(scales)), width, 1, bias=False)
        self.norm = RMSNorm2d(width)

    def linear_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # each (B, h, d, N)
        # fp32 throughout: the sums over N tokens overflow fp16 (spec §2.3 step 3, §8.3).
        q, k, v = F.relu(q.float()), F.relu(k.float()), v.float()
        v = F.pad(v, (0, 0, 0, 1), value=1.0)                               # (B, h, d+1, N): last row of ones
        out = (v @ k.transpose(-1, -2)) @ q                                 # (B, h, d+1, N): O(N d^2)
        # Row d is sum_j relu(k_j) . relu(q_i), the normaliser of SANA Eq. 1, from the same two matmuls.
        return out[:, :, :-1] / (out[:, :, -1:] + self.eps)                 # (B, h, d, N)

    def quadratic_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # each (B, h, d, N)
        # For N <= d the N x N map is cheaper than the d x d one. Matmuls in the input dtype, normalisation in
        # fp32, exactly as efficientvit `relu_quadratic_att` and diffusers do.
        q, k = F.relu(q), F.relu(k)
        scores = (k.transpose(-1, -2) @ q).float()                          # (B, h, N_keys, N_queries)
        scores = scores / (scores.sum(dim=2, keepdim=True) + self.eps)      # normalise over keys
        return v @ scores.to(v.dtype)                                       # (B, h, d, N)

    def forward(self, x: Tensor) -> Tensor:                                 # x: (B, C, H, W)
        B, C, H, W = x.shape
        qkv = self.qkv(x)                                                   # (B, 3C, H, W)
        qkv = torch.cat([qkv, *(agg(qkv) for agg in self.aggreg)], dim=1)   # (B, 3C(1+S), H, W)
        qkv = qkv.reshape(B, -1, 3 * self.head_dim, H * W)                  # (B, h(1+S), 3d, N)
        q, k, v = qkv.chunk(3, dim=2)                                       # each (B, h(1+S), d, N)
        # Same switch as efficientvit/diffusers: it depends on the input size, not on a configured name.
        attend = self.linear_attention if H * W > self.head_dim else self.quadratic_attention
        out = attend(q, k, v).to(x.dtype).reshape(B, -1, H, W)              # (B, C(1+S), H, W)
        return x + self.norm(self.proj(out))                                # (B, C, H, W)


class GLUMBConv(nn.Module):
    """x + Norm(Point(a * SiLU(gate))), [a, gate] = DWConv3x3(SiLU(Conv1x1(x))): expand 4 (spec §2.3)."""

    def __init__(self, width: int, expand: int = 4):
        super().__init__()
        hidden = expand * width
        self.inverted = nn.Conv2d(width, 2 * hidden, 1)
        self.depthwise = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.point = nn.Conv2d(hidden, width, 1, bias=False)
        self.norm = RMSNorm2d(width)

    def forward(self, x: Tensor) -> Tensor:                                 # x: (B, C, H, W)
        h, gate = self.depthwise(F.silu(self.inverted(x))).chunk(2, dim=1)  # 2 x (B, 4C, H, W)
        return x + self.norm(self.point(h * F.silu(gate)))


class EfficientViTBlock(nn.Module):
    """Global context (linear attention) then local mixing (GLUMBConv), each residual."""

    def __init__(self, width: int, head_dim: int, scales: tuple[int, ...]):
        super().__init__()
        self.attn = LiteMLA(width, head_dim, scales)
        self.ffn = GLUMBConv(width)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn(self.attn(x))


####################################################################################################################
# Space <-> channel shortcuts (spec §2.4): parameter-free, so the residual path carries the image through the
# compression and the convs only learn a correction (DC-AE paper, "Residual Autoencoding").
####################################################################################################################

def channel_average(x: Tensor, c_out: int) -> Tensor:                       # x: (B, C, H, W)
    return x.unflatten(1, (c_out, -1)).mean(dim=2)                          # (B, c_out, H, W), consecutive groups


def channel_duplicate(x: Tensor, c_out: int) -> Tensor:                     # x: (B, C, H, W)
    r = c_out // x.shape[1]
    return x.repeat_interleave(r, dim=1, output_size=c_out)                 # (B, c_out, H, W), each channel r times


class DownBlock(nn.Module):
    """Stride-2 conv + pixel_unshuffle channel-averaging shortcut: (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = conv3x3(c_in, c_out, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = channel_average(F.pixel_unshuffle(x, 2), self.conv.out_channels)   # (B, C_out, H/2, W/2)
        return self.conv(x) + shortcut


class UpBlock(nn.Module):
    """Nearest x2 + conv, + channel-duplicating pixel_shuffle shortcut: (B, C_in, H, W) -> (B, C_out, 2H, 2W)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = conv3x3(c_in, c_out)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = F.pixel_shuffle(channel_duplicate(x, 4 * self.conv.out_channels), 2)  # (B, C_out, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")) + shortcut


def make_block(cfg: DCAEConfig, stage: int) -> nn.Module:
    width = cfg.widths[stage]
    if cfg.vit_stages[stage]:
        return EfficientViTBlock(width, cfg.attention_head_dim, cfg.qkv_multiscales[stage])
    return ResBlock(width)


####################################################################################################################
# Encoder, decoder, autoencoder (spec §2.2)
####################################################################################################################

class Encoder(nn.Module):
    """(B, in_channels, H, W) -> unscaled latent (B, latent_channels, H/f, W/f), f = cfg.compression."""

    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        w, n = cfg.widths, len(cfg.widths)
        self.latent_channels = cfg.latent_channels
        self.conv_in = conv3x3(cfg.in_channels, w[0])
        self.stages = nn.ModuleList(
            nn.Sequential(*(make_block(cfg, i) for _ in range(cfg.encoder_depths[i])),
                          *([DownBlock(w[i], w[i + 1])] if i < n - 1 else []))
            for i in range(n))
        self.conv_out = conv3x3(w[-1], cfg.latent_channels)

    def forward(self, x: Tensor) -> Tensor:                                 # x: (B, 3, H, W)
        x = self.conv_in(x)                                                 # (B, w0, H, W)
        for stage in self.stages:                                           # stage i ends with its down block
            x = stage(x)                                                    # (B, w_{i+1}, H/2^(i+1), W/2^(i+1))
        # after the last stage (no down block): (B, w[-1], H/f, W/f)
        return self.conv_out(x) + channel_average(x, self.latent_channels)  # (B, C_lat, H/f, W/f)


class Decoder(nn.Module):
    """Unscaled latent (B, latent_channels, h, w) -> image (B, in_channels, h*f, w*f)."""

    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        w, n = cfg.widths, len(cfg.widths)
        self.conv_in = conv3x3(cfg.latent_channels, w[-1])
        self.stages = nn.ModuleList(
            nn.Sequential(*([UpBlock(w[i + 1], w[i])] if i < n - 1 else []),
                          *(make_block(cfg, i) for _ in range(cfg.decoder_depths[i])))
            for i in range(n))
        self.norm_out = RMSNorm2d(w[0])
        self.conv_out = conv3x3(w[0], cfg.in_channels)

    def forward(self, z: Tensor) -> Tensor:                                 # z: (B, C_lat, h, w)
        x = self.conv_in(z) + channel_duplicate(z, self.conv_in.out_channels)   # (B, w[-1], h, w)
        for stage in reversed(self.stages):                                 # lowest resolution first
            x = stage(x)                                                    # (B, w_i, h 2^(n-1-i), w 2^(n-1-i))
        return self.conv_out(F.relu(self.norm_out(x)))                      # (B, 3, h f, w f)


class DCAE(nn.Module):
    """Deterministic autoencoder; `encode`/`decode` work in the scaled latent space the DiT is trained on.

    Initialisation for training from scratch: PyTorch's defaults for the convs (Kaiming-uniform weights),
    weight 1 and bias 0 for every RMSNorm2d. The spec prescribes no other scheme.
    """

    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def compression(self) -> int:
        return self.cfg.compression

    def encode(self, x: Tensor) -> Tensor:                                  # x: (B, 3, H, W) in [-1, 1]
        f = self.compression
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"encode: x has shape {tuple(x.shape)}; expected (B, {self.cfg.in_channels}, H, W)")
        for name, size in (("height", x.shape[2]), ("width", x.shape[3])):
            if size < 1 or size % f:
                raise ValueError(f"encode: x has {name}={size}; it must be a positive multiple of {f} "
                                 f"(the DC-AE downsamples by {f})")
        return self.encoder(x) * self.cfg.scaling_factor                    # (B, C_lat, H/f, W/f), spec §2.5

    def decode(self, z: Tensor) -> Tensor:                                  # z: (B, C_lat, h, w), scaled
        if z.ndim != 4 or z.shape[1] != self.cfg.latent_channels or z.shape[2] < 1 or z.shape[3] < 1:
            raise ValueError(f"decode: z has shape {tuple(z.shape)}; expected "
                             f"(B, {self.cfg.latent_channels}, h, w) with h, w >= 1")
        m = self.cfg.decode_margin
        if not m:
            return self.decoder(z / self.cfg.scaling_factor)                # (B, 3, h f, w f)
        # The decoder zero-pads every conv, so the image's outermost pixels are the ones it learns last: the small
        # bundled AE, trained from scratch, still misses flat borders by ~10-25/255 in its outermost pixel while
        # its interior is within ~1/255. Decoding a latent extended by m replicated cells per side and cropping
        # the extra m f px puts those pixels in the interior (docs/bundled-model.md).
        f = m * self.compression
        x = self.decoder(F.pad(z / self.cfg.scaling_factor, (m, m, m, m), mode="replicate"))  # (B, 3, (h+2m) f, ...)
        return x[..., f:-f, f:-f]                                           # (B, 3, h f, w f)

    def forward(self, x: Tensor, return_latent: bool = False, latent_noise: Tensor | None = None,
                mix: Tensor | None = None, keep: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Reconstruction for autoencoder training; the scaling factor cancels, so it is not applied. With
        return_latent, also the unscaled latent (for a penalty on it; DDP only sees calls of forward).

        latent_noise (shaped like the latent, drawn by the caller) is added to the latent before decoding, in units
        of each image's latent RMS (detached, so the encoder cannot shrink the noise by growing the latent).
        mix (B,) in [0, 1]: also decode the blends mix z_i + (1 - mix) z_(i-1) of each latent with the previous
        one in the batch, in the same decoder call; the reconstruction then has 2B images, the blends last.
        keep (B,) ints: decode image i from its first keep[i] latent channels, the others zeroed (DC-AE 1.5's
        structured latent; the blends are decoded whole)."""
        z = self.encoder(x)
        zd = z
        if latent_noise is not None:
            rms = z.detach().float().square().mean((1, 2, 3), keepdim=True).sqrt()   # (B, 1, 1, 1)
            zd = z + (latent_noise * rms).to(z.dtype)
        if keep is not None:
            channel = torch.arange(z.shape[1], device=z.device)
            zd = zd * (channel[None, :] < keep[:, None]).to(z.dtype)[:, :, None, None]   # (B, C, 1, 1) mask
        if mix is not None:
            a = mix.to(z.dtype)[:, None, None, None]
            zd = torch.cat([zd, a * z + (1 - a) * z.roll(1, 0)])                      # (2B, C, h, w)
        recon = self.decoder(zd)
        return (recon, z) if return_latent else recon
