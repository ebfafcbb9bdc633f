"""The DC-AE's training task: pixel reconstruction, then the latent scale the DiT is trained in (sana-spec §2).

prepare() decodes the data set once, resized and centre-cropped to `resolution`, into a uint8 cache
(run/cache/dcae.safetensors), so a resumed run starts without decoding again. Every process holds all of it in
memory: 3 r^2 bytes an image, 192 KiB at 256 px. The last `eval_samples` images (in the reader's order, which is
sorted and stable) are held out: never trained on, used only for the PSNR in run/ae_metrics.json.

Loss: l1 * |x_hat - x| + l2 * (x_hat - x)^2, averaged, on images in [-1, 1] (§2.5). The DC-AE paper adds LPIPS and
a GAN loss (arXiv 2410.10733); both need downloaded networks, so they are left out and reconstructions are blurrier
than the released AE's. A batch draws no randomness (no augmentation): the step's generator goes unused.

export() measures the unscaled encoder output on `stats_samples` training images and sets scaling_factor =
1 / std, so that the latents the DiT sees, Enc(x) * scaling_factor, have unit variance: how SANA's 0.41407 was
chosen (§2.5). Like SANA, there is no shift (§8 item 11); the latent mean is reported so that one can check it is
small.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .files import atomic_write, write_json_atomic
from .data import cover_crop
from .dcae import DCAE, DCAE_PRESETS, DCAEConfig
from .hub import save_dcae
from .train import (BatchOrder, DataError, DistEnv, TrainConfig, cache_metadata, channel_counts,
                    draw_channel_counts, fingerprint, model_config, open_dataset)

CACHE_VERSION = 1                        # bump when the cached pixels would change for the same key (e.g. resampling)


@dataclass(frozen=True)
class DCAEOptions:
    resolution: int = 256                # square training images; a multiple of the AE's compression
    l1: float = 1.0                      # weight of the mean absolute error
    l2: float = 1.0                      # weight of the mean squared error
    # Weight of the mean absolute error of the images' finite differences (x and y), on the reconstruction of
    # whole latents. Flat shapes are mostly flat pixels: the per-pixel losses above barely weigh an outline, yet
    # the outline is what tells a small hexagon from a disc (the evaluator's radial harmonics, geneval.py). The
    # difference loss puts all of its weight on the edges. 0: off. (A gradient-difference loss; recalled, not
    # from the DC-AE paper, which uses LPIPS and a GAN for sharpness, both needing downloaded networks.) On the
    # shapes preset, weight 2 lost more than it gained: evaluator ratio 0.719 against 0.815, more hexagons read
    # as discs (docs/bundled-model.md, fourteenth round), so the preset leaves it off.
    edge: float = 0.0
    # Weight of mean(z^2) on the unscaled latent. The decoder normalises (RMSNorm) right after its input, so
    # nothing else bounds the latent's scale: without this, latents drifted to std ~2000 in 600 steps (measured
    # on shapes at 128 px), with per-channel means of +-1000, an ill-conditioned target for the DiT.
    latent_l2: float = 0.0
    # Train on random crop x crop windows of the resolution x resolution images (0: whole images). The AE is
    # convolutional, so it learns the images' scale from crops at a fraction of the cost and is evaluated on whole
    # images. Offsets are multiples of the compression, so every crop keeps the latent grid of its full image.
    crop: int = 0
    # Noise-augmented decoding: the decoder is trained on z + sigma * rms(z) * eps, eps ~ N(0, I), with one
    # sigma ~ |N(0, latent_noise^2)| per image (0: off). The DiT's samples are never exact latents; a decoder that
    # has learned to map a neighbourhood of each latent to the clean image turns imprecise samples into crisp
    # shapes, and the encoder, trained through the noisy decoder, has to spread what it encodes over directions
    # that survive noise. The idea of RAE's noise-augmented decoder (arXiv 2510.11690; recalled, not checked here).
    latent_noise: float = 0.0
    # Weight of a loss on decoded latent blends: each image's latent is mixed with its neighbour's in the batch,
    # a z_i + (1 - a) z_j with a ~ U(0, 1) per image, and the decoder must give a x_i + (1 - a) x_j (0: off). The
    # DiT's predictions at high noise are such blends; without this the decoder renders half an object's latent
    # offset as no object at all (benchmarks/ae_interpolation.py, docs/bundled-model.md sixth round).
    latent_mix: float = 0.0
    # Structured latent space (DC-AE 1.5, arXiv 2508.00413): each image's latent is decoded from its first c
    # channels only, the rest zeroed, with c drawn per image uniformly from this list (empty: off; repeat the full
    # count to decode whole latents more often). The front channels then have to carry the image's layout alone
    # and the later ones only add detail, which is what a DiT must settle first at high noise.
    keep_channels: tuple[int, ...] = ()
    # Pixel-anchored channels: the first 3 * anchor_grid^2 channels of the unscaled latent are pulled (weight
    # `anchor`, 0: off) towards anchor_gain times the image average-pooled to anchor_grid x anchor_grid colours per
    # latent cell (space-to-channel), minus the image's median colour (the background, in the shapes data). In a
    # plain DC-AE latent an object's colour is quiet: recolouring it moves the latent about as far as shifting it by
    # 6 px (benchmarks/latent_attributes.py), so the DiT's loss barely rewards the caption's colours and its small
    # errors change them. Anchored channels make objects' colours and coarse layout loud and linear; the others keep
    # the detail. Without the median the background's colour dominated the anchored channels' variance and left the
    # objects quieter than before (docs/bundled-model.md, eighth round). The architecture is unchanged.
    anchor: float = 0.0
    anchor_gain: float = 3.0
    anchor_grid: int = 2
    stats_samples: int = 512             # training images whose latents set the scaling factor
    eval_samples: int = 64               # images held out of training, for the PSNR in ae_metrics.json

    def __post_init__(self):
        object.__setattr__(self, "keep_channels", channel_counts("keep_channels", self.keep_channels))
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or self.resolution < 1:
            raise ValueError(f"options.resolution={self.resolution!r}: must be a positive int")
        if not (self.l1 >= 0 and self.l2 >= 0 and self.l1 + self.l2 > 0 and math.isfinite(self.l1 + self.l2)):
            raise ValueError(f"options.l1={self.l1}, options.l2={self.l2}: must be >= 0, finite, not both 0")
        if not (self.latent_l2 >= 0 and math.isfinite(self.latent_l2)):
            raise ValueError(f"options.latent_l2={self.latent_l2}: must be >= 0 and finite")
        for name in ("latent_noise", "latent_mix", "anchor", "edge"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"options.{name}={getattr(self, name)}: must be >= 0 and finite")
        if not (self.anchor_gain > 0 and math.isfinite(self.anchor_gain)) or self.anchor_grid < 1:
            raise ValueError(f"options.anchor_gain={self.anchor_gain} must be > 0 and finite, "
                             f"options.anchor_grid={self.anchor_grid} >= 1")
        if not 0 <= self.crop <= self.resolution:
            raise ValueError(f"options.crop={self.crop}: must be in [0, options.resolution={self.resolution}]")
        if self.stats_samples < 1 or self.eval_samples < 0:
            raise ValueError(f"options.stats_samples={self.stats_samples} must be >= 1 and "
                             f"options.eval_samples={self.eval_samples} >= 0")


def to_signed(images: Tensor) -> Tensor:
    return images.float() / 127.5 - 1                                       # uint8 -> [-1, 1] (§2.5)


def edge_loss(x_hat: Tensor, x: Tensor) -> Tensor:
    """Mean absolute error of the horizontal and vertical neighbour differences of (B, C, H, W) images."""
    err = x_hat.float() - x
    dx = err[..., :, 1:] - err[..., :, :-1]          # (B, C, H, W-1)
    dy = err[..., 1:, :] - err[..., :-1, :]          # (B, C, H-1, W)
    return dx.abs().mean() + dy.abs().mean()


def psnr(x_hat: Tensor, x: Tensor) -> Tensor:
    """Per-image PSNR in dB of (B, 3, H, W) images in [-1, 1], measured on [0, 1] after clamping x_hat."""
    a, b = (x_hat.float().clamp(-1, 1) + 1) / 2, (x.float() + 1) / 2
    mse = (a - b).square().flatten(1).mean(1).clamp_min(1e-10)              # identical images: 100 dB, not inf
    return -10 * torch.log10(mse)                                           # (B,)


class DCAETask:
    Options = DCAEOptions

    def __init__(self, cfg: TrainConfig, run: Path, env: DistEnv):
        self.cfg, self.opt, self.run, self.env = cfg, cfg.options, Path(run), env
        self.model_cfg = model_config(cfg.model, DCAE_PRESETS, DCAEConfig)
        f = self.model_cfg.compression
        for name in ("resolution", "crop"):
            if getattr(self.opt, name) % f:
                raise ValueError(f"options.{name}={getattr(self.opt, name)}: must be a multiple of the DC-AE's "
                                 f"compression {f}")
        channel_counts("keep_channels", self.opt.keep_channels, self.model_cfg.latent_channels)
        g = self.opt.anchor_grid
        if self.opt.anchor and (f % g or 3 * g * g > self.model_cfg.latent_channels):
            raise ValueError(f"options.anchor_grid={g}: must divide the compression {f} and give 3 * {g}^2 <= "
                             f"{self.model_cfg.latent_channels} latent channels")

    # ------------------------------------------------------------------------------------------------- data

    def prepare(self) -> dict:
        data, cache = Path(self.cfg.data), self.run / "cache" / "dcae.safetensors"
        reader = open_dataset(data)                           # DataError if the folder is missing, on every rank
        key = json.dumps({"data": str(data.resolve()), "files": fingerprint(data),
                          "resolution": self.opt.resolution, "version": CACHE_VERSION})
        fresh = cache.is_file() and cache_metadata(cache).get("key") == key
        if not fresh:                                         # rank 0 builds, the others then read what it wrote
            self.env.on_main(lambda: self._build_cache(reader, cache, key))
        with safe_open(cache, "pt") as f:
            images, skipped = f.get_tensor("images"), json.loads(f.metadata()["skipped"])
        n, n_eval = len(images), self.opt.eval_samples
        if n == 0:
            raise DataError(f"data={str(data)!r}: no readable images (skipped: {skipped})")
        if n - n_eval < self.cfg.batch_size:
            raise DataError(f"data={str(data)!r}: {n} images, of which options.eval_samples={n_eval} are held out, "
                            f"leave {n - n_eval} for training: fewer than batch_size={self.cfg.batch_size}")
        self.images, self.n_train = images, n - n_eval                    # (N, 3, r, r) uint8, on the CPU
        self.order = BatchOrder({self.opt.resolution: torch.arange(self.n_train)}, self.cfg.batch_size, self.cfg.seed)
        return {"samples": self.n_train, "eval_samples": n_eval, "skipped": skipped,
                "cache": "reused" if fresh else "built"}

    def _build_cache(self, reader, cache: Path, key: str) -> None:
        size = self.opt.resolution
        images = [np.ascontiguousarray(cover_crop(s.image, size, size).transpose(2, 0, 1)) for s in reader]
        stacked = np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8)
        cache.parent.mkdir(parents=True, exist_ok=True)
        # One file holds the pixels and the key they were made for, so the two are replaced together.
        atomic_write(cache, lambda p: save_file({"images": torch.from_numpy(stacked)}, p,
                                                metadata={"key": key, "skipped": json.dumps(dict(reader.skipped))}))

    # ------------------------------------------------------------------------------------------------ steps

    def build_model(self) -> nn.Module:
        return DCAE(self.model_cfg)                           # PyTorch's default init (dcae.DCAE docstring)

    def batch(self, step: int, g: torch.Generator) -> dict[str, Tensor]:
        _, idx = self.order(step)
        x = self.images[self.env.local(idx)]                              # (b, 3, r, r) uint8
        c, f = self.opt.crop, self.model_cfg.compression
        if c and c < x.shape[-1]:
            # One offset per image, on the latent grid, drawn from the step's generator for every image of the
            # global batch (so each rank's share is the same whatever the world size), then sliced locally.
            n = len(idx)
            top, left = (torch.randint(0, (x.shape[-1] - c) // f + 1, (2, n), generator=g) * f).tolist()
            keep = self.env.local(torch.arange(n)).tolist()
            x = torch.stack([im[:, top[i]:top[i] + c, left[i]:left[i] + c] for im, i in zip(x, keep)])
        out = {"images": to_signed(x.to(self.env.device))}                 # (b, 3, c, c), moved as uint8
        if self.opt.latent_noise:
            # Drawn for the whole global batch from the step's generator, then sliced, like the crop offsets.
            n, h, w = len(idx), x.shape[-2] // f, x.shape[-1] // f
            sigma = torch.randn(n, 1, 1, 1, generator=g).abs() * self.opt.latent_noise
            eps = torch.randn(n, self.model_cfg.latent_channels, h, w, generator=g)
            out["latent_noise"] = self.env.local(sigma * eps).to(self.env.device)      # (b, C_lat, h, w)
        if self.opt.latent_mix:
            # One weight per image of the global batch, sliced like the rest; image i's partner is image i - 1 of
            # the same rank's share (DCAE.forward), so no latent crosses processes.
            out["mix"] = self.env.local(torch.rand(len(idx), generator=g)).to(self.env.device)   # (b,)
        if self.opt.keep_channels:
            keep = draw_channel_counts(self.opt.keep_channels, len(idx), g)             # (b,) channel counts
            out["keep"] = self.env.local(keep).to(self.env.device)
        return out

    def pixel_loss(self, x_hat: Tensor, x: Tensor) -> Tensor:
        err = x_hat.float() - x
        return self.opt.l1 * err.abs().mean() + self.opt.l2 * err.square().mean()

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        x = batch["images"]
        # Dec(Enc(x) [+ noise]) and Enc(x), no scaling (dcae.DCAE)
        mix = batch.get("mix")
        recon, z = model(x, return_latent=True, latent_noise=batch.get("latent_noise"), mix=mix,
                         keep=batch.get("keep"))
        loss = self.pixel_loss(recon[:len(x)], x)
        if self.opt.edge:
            loss = loss + self.opt.edge * edge_loss(recon[:len(x)], x)
        if mix is not None:
            a = mix[:, None, None, None]
            loss = loss + self.opt.latent_mix * self.pixel_loss(recon[len(x):], a * x + (1 - a) * x.roll(1, 0))
        if self.opt.anchor:
            anchored = z[:, :3 * self.opt.anchor_grid ** 2].float()                       # (b, 3 g^2, h, w)
            loss = loss + self.opt.anchor * F.mse_loss(anchored, self.anchor_target(x))
        return loss + self.opt.latent_l2 * z.float().square().mean() if self.opt.latent_l2 else loss

    def anchor_target(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, 3 g^2, H/f, W/f): anchor_gain times each latent cell's g x g mean
        colours less the image's per-channel median, channel c g^2 + i g + j for colour c and sub-block (i, j)
        (F.pixel_unshuffle's order)."""
        g, x = self.opt.anchor_grid, x.float()
        pooled = F.avg_pool2d(x, self.model_cfg.compression // g)             # (B, 3, g H/f, g W/f)
        median = x.flatten(2).median(dim=2).values[:, :, None, None]         # (B, 3, 1, 1)
        return self.opt.anchor_gain * F.pixel_unshuffle(pooled - median, g)  # (B, 3 g^2, H/f, W/f)

    # ----------------------------------------------------------------------------------------------- export

    @torch.no_grad()
    def export(self, model: nn.Module, folder: Path) -> None:
        # The model's own device: under FSDP the loop gathers a CPU copy to export. Batches of one step's share.
        device, bs = next(model.parameters()).device, max(1, self.cfg.batch_size // self.env.world)
        stats_images = self.images[:min(self.opt.stats_samples, self.n_train)]
        z = torch.cat([model.encoder(to_signed(x.to(device))).float().cpu()
                       for x in stats_images.split(bs)])                   # (n, C, r/f, r/f), unscaled
        std = z.std().item()
        scaled = dataclasses.replace(model.cfg, scaling_factor=1 / std)   # Enc(x) * s has unit variance (§2.5)
        with torch.device("meta"):
            out = DCAE(scaled)
        out.load_state_dict(model.state_dict(), assign=True)              # shares the trained tensors
        save_dcae(out, folder)

        held_out = self.images[self.n_train:]
        # Through encode/decode, as the pipeline uses the AE (decode_margin included).
        scores = [psnr(model.decode(model.encode(x)), x) for x in (to_signed(b.to(device)) for b in held_out.split(bs))]
        metrics = {
            "scaling_factor": 1 / std,
            "latent": {"samples": len(z), "shape": list(z.shape[1:]), "mean": z.mean().item(), "std": std,
                       "channel_mean": z.mean((0, 2, 3)).tolist(), "channel_std": z.std((0, 2, 3)).tolist()},
            "eval": {"samples": len(held_out),
                     "psnr_db": torch.cat(scores).mean().item() if scores else None},   # mean of per-image PSNR
        }
        write_json_atomic(self.run / "ae_metrics.json", metrics)
