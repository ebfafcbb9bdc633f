"""The linear DiT's training task: flow matching on cached DC-AE latents and text embeddings (sana-spec §4).

prepare() runs the frozen autoencoder and text encoder over the data set once and caches the results
(run/cache/dit.safetensors); every step then costs only the DiT. A step's batch, for each image of the global
batch (all randomness from the step's generator, train.py):
  - one of its captions, drawn with SANA's caption-score weights (§4.8, train.caption_weights),
  - with probability `caption_dropout` the empty prompt's embedding instead, for classifier-free guidance (§4.7),
  - t: logit-normal u, SANA's 1000-level grid and flow shift (§4.2),
  - noise, and x_t = (1 - t) x0 + t noise; the target is v = noise - x0 (§4.1, flow.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .dit import DIT_PRESETS, DiT, DiTConfig
from .files import atomic_write
from .flow import flow_path, network_time, shift_time, velocity_target
from .train import (BatchOrder, DataError, DistEnv, TrainConfig, cache_metadata, caption_weights,
                    channel_counts, draw_channel_counts, fingerprint, model_config, open_dataset)


@dataclass(frozen=True)
class DiTOptions:
    vae: str = ""                        # a diffusers AutoencoderDC folder (e.g. the dcae task's run/model)
    text_encoder: str = ""               # a folder with text_encoder/ and tokenizer/ (e.g. the text task's run/model)
    text_max_length: int = 300           # TextConfig.max_length (§3.4)
    chi: bool = True                     # prepend the complex human instruction (§3.3); off for models without it
    resolution: int = 512                # training resolution (square), or the bucket table's native size
    buckets: bool = False                # aspect-ratio buckets (§4.9) instead of center-cropped squares
    flow_shift: float = 3.0              # §4.2; the same shift is used for sampling
    logit_mean: float = 0.0              # §4.2
    logit_std: float = 1.0
    discrete_time: bool = True           # NVlabs: t on the 1000-level grid, the network sees floor(1000 t) (§4.2)
    caption_dropout: float = 0.1         # §4.7
    caption_rule: str = "clipscore"      # §4.8: "clipscore" (NVlabs code), "softmax" (paper), "uniform", "best"
    caption_temperature: float = 0.1     # τ of §4.8
    caption_threshold: float = 0.0       # clipscore's keep threshold: 25.0 for CLIP scores; shapes scores are in [0, 1]
    captions_per_image: int = 0          # cache at most this many captions per image (best first); 0 = all
    encode_batch: int = 32               # images / captions per frozen-encoder call while caching
    y_norm_init: float = 0.01            # initial scale of the caption RMSNorm (§2.3; DiT.init_weights)
    # Augmented diffusion training (DC-AE 1.5, arXiv 2508.00413), for autoencoders trained with a structured
    # latent (DCAEOptions.keep_channels): each image's loss covers only its first c latent channels, c drawn
    # uniformly from this list (empty: all channels). The front channels, which hold the layout, then weigh more.
    loss_channels: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "loss_channels", channel_counts("loss_channels", self.loss_channels))
        if self.caption_rule not in ("clipscore", "softmax", "uniform", "best"):
            raise ValueError(f"options.caption_rule={self.caption_rule!r}: one of clipscore, softmax, uniform, best")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"options.caption_dropout={self.caption_dropout}: must be in [0, 1)")
        if self.flow_shift <= 0 or self.caption_temperature <= 0 or self.logit_std <= 0 or self.y_norm_init <= 0:
            raise ValueError("options.flow_shift, caption_temperature, logit_std and y_norm_init must be > 0")


def bucket_sizes(resolution: int, multiple: int) -> dict[str, tuple[int, int]]:
    """Aspect-ratio buckets {"h/w": (h, w)} (sana-spec §4.9): SANA's own tables at 512 ... 4096 px, else the 1024
    table scaled to `resolution`, sides rounded to a multiple of the autoencoder's compression."""
    from .pipeline import aspect_ratio_bins
    if resolution in (512, 1024, 2048, 4096):
        return aspect_ratio_bins(resolution)
    scaled = {}
    for ratio, (h, w) in aspect_ratio_bins(1024).items():
        size = tuple(max(multiple, round(v * resolution / 1024 / multiple) * multiple) for v in (h, w))
        scaled.setdefault(size, ratio)                       # small resolutions merge neighbouring ratios
    return {ratio: size for size, ratio in scaled.items()}


def text_encoder(o: DiTOptions, device: str | torch.device = "cpu"):
    """The frozen text encoder of options.text_encoder, with the text settings the DiT is trained on."""
    from .text import CHI_DIFFUSERS, TextConfig, TextEncoder
    folder = Path(o.text_encoder)
    return TextEncoder.from_pretrained(folder / "text_encoder", folder / "tokenizer", device=device,
                                       config=TextConfig(max_length=o.text_max_length,
                                                         chi=CHI_DIFFUSERS if o.chi else None))


class DiTTask:
    Options = DiTOptions

    def __init__(self, cfg: TrainConfig, run: Path, env: DistEnv):
        self.cfg, self.opt, self.run, self.env = cfg, cfg.options, Path(run), env
        self.model_cfg = model_config(cfg.model, DIT_PRESETS, DiTConfig)
        channel_counts("loss_channels", self.opt.loss_channels, self.model_cfg.in_channels)

    # ------------------------------------------------------------------------------------------------- data

    def _cache_key(self) -> dict:
        o = self.opt
        return {"data": str(Path(self.cfg.data).resolve()), "files": fingerprint(self.cfg.data),
                "resolution": o.resolution, "buckets": o.buckets,
                "vae": fingerprint(o.vae), "text_encoder": fingerprint(o.text_encoder),
                "text_max_length": o.text_max_length, "chi": o.chi, "captions_per_image": o.captions_per_image}

    def prepare(self) -> dict:
        o, cache = self.opt, self.run / "cache" / "dit.safetensors"
        for name in ("vae", "text_encoder"):
            if not getattr(o, name) or not Path(getattr(o, name)).is_dir():
                raise DataError(f"options.{name}={getattr(o, name)!r}: no such folder (train it first with "
                                f"`sanaflow train --preset ...`)")
        reader = open_dataset(self.cfg.data)
        key = json.dumps(self._cache_key())
        fresh = cache_metadata(cache).get("key") == key
        if not fresh:                                         # rank 0 builds, the others then read what it wrote
            self.env.on_main(lambda: self._build_cache(reader, cache, key))
        self.data = load_file(cache)
        info = json.loads(cache_metadata(cache)["info"])
        lat = self.data["latents"]
        if lat.shape[1] != self.model_cfg.in_channels or self.data["text"].shape[-1] != self.model_cfg.caption_channels:
            raise ValueError(f"model: in_channels={self.model_cfg.in_channels}, caption_channels="
                             f"{self.model_cfg.caption_channels} but the autoencoder gives {lat.shape[1]} latent "
                             f"channels and the text encoder {self.data['text'].shape[-1]} features")
        # Captions are stored grouped by image: image i owns rows first_caption[i] .. first_caption[i + 1] - 1.
        self.first_caption = torch.searchsorted(self.data["caption_image"], torch.arange(len(lat) + 1)).tolist()
        self.caption_keys = self._caption_keys()
        shapes = self.data["image_shape"]                                    # (N, 2) latent h, w
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, (h, w) in enumerate(shapes.tolist()):
            buckets.setdefault((h, w), []).append(i)
        self.order = BatchOrder({k: torch.tensor(v) for k, v in buckets.items()}, self.cfg.batch_size, self.cfg.seed)
        return info

    def _caption_keys(self) -> Tensor:
        """Caption choice (§4.8), computed once: row r of image i gets the key i + (cumulative weight of i's
        captions up to r), so that searchsorted(keys, i + u, right=True) with u ~ U[0, 1) draws image i's caption
        from its weights, for a whole batch at once. Images without scores draw uniformly. float64: i + u must
        resolve u for a million images."""
        o, scores, first = self.opt, self.data["caption_score"], self.first_caption
        keys = torch.empty(len(scores), dtype=torch.float64)
        for i in range(len(first) - 1):
            s = scores[first[i]:first[i + 1]].double()
            w = torch.ones_like(s) if s.isnan().any() else caption_weights(
                s, o.caption_rule, o.caption_temperature, o.caption_threshold)
            cdf = w.cumsum(0) / w.sum()
            cdf[-1] = 1.0                                                    # no rounding gap at the top
            keys[first[i]:first[i + 1]] = i + cdf
        return keys

    @torch.no_grad()
    def _build_cache(self, reader, cache: Path, key: str) -> None:
        from .data import CaptionError, captions_from_json, cover_crop
        from .hub import load_dcae
        o, device = self.opt, self.env.device
        vae = load_dcae(o.vae).to(device)
        text = text_encoder(o, device)
        bins = bucket_sizes(o.resolution, vae.cfg.compression) if o.buckets else {"1.0": (o.resolution, o.resolution)}
        ratios = torch.tensor([float(r) for r in bins])
        groups: dict[tuple[int, int], list[tuple[np.ndarray, list]]] = {}
        uncaptioned = 0
        for s in reader:
            h, w = s.image.shape[:2]
            size = bins[list(bins)[int((ratios - h / w).abs().argmin())]]   # the bucket of the closest ratio
            try:                                 # any caption layout the readers accept (data.captions_from_json)
                caps = [c for c in captions_from_json(s.meta) if c["text"]]
            except CaptionError:
                caps = []
            caps = sorted(caps, key=lambda c: -(c["score"] or 0))[: o.captions_per_image or None]
            if caps:
                groups.setdefault(size, []).append((cover_crop(s.image, *size), caps))
            else:
                uncaptioned += 1
        skipped = {**reader.skipped, **({"no_caption": uncaptioned} if uncaptioned else {})}
        if not groups:
            raise DataError(f"data={self.cfg.data!r}: no usable samples (skipped: {skipped})")
        latents, shapes, cap_image, cap_score, cap_text = [], [], [], [], []
        for (hh, ww), items in sorted(groups.items()):
            for i in range(0, len(items), o.encode_batch):
                chunk = items[i:i + o.encode_batch]
                images = torch.from_numpy(np.stack([im for im, _ in chunk])).permute(0, 3, 1, 2).float() / 127.5 - 1
                z = vae.encode(images.to(device)).float().cpu()               # (b, C, hh/f, ww/f)
                for zi, (_, caps) in zip(z, chunk):
                    n = len(latents)
                    latents.append(zi)
                    shapes.append(zi.shape[1:])
                    for c in caps:
                        cap_image.append(n)
                        cap_score.append(float("nan") if c["score"] is None else float(c["score"]))
                        cap_text.append(c["text"])
        # Captions in order of length, each batch padded to its longest only (shapes captions: 13 of 64 tokens on
        # average, so this is ~4x less work), then zero-padded to N with a 0 mask, which the DiT never attends to.
        N = text.config.max_length
        order = sorted(range(len(cap_text)), key=lambda k: len(cap_text[k])) if not o.chi else range(len(cap_text))
        embeds, mask = None, torch.zeros(len(cap_text), N, dtype=torch.long)
        for i in range(0, len(cap_text), o.encode_batch):
            rows = list(order[i:i + o.encode_batch])
            e, m = text.encode([cap_text[k] for k in rows], pad_to_longest=not o.chi)     # (b, n, D), (b, n)
            if embeds is None:
                embeds = torch.zeros(len(cap_text), N, e.shape[-1])                      # (captions, N, D)
            embeds[rows, :e.shape[1]] = e.float().cpu()
            mask[rows, :m.shape[1]] = m.cpu()
        null, null_mask = text.encode_negative("", 1)
        length = int(max(mask.sum(1).max(), null_mask.sum()))             # drop the all-padding tail columns
        same_shape = len({tuple(s) for s in shapes}) == 1
        data = {
            # Latents of different buckets have different shapes; they are stored padded to the largest.
            "latents": torch.stack(latents) if same_shape else _pad_stack(latents),
            "image_shape": torch.tensor([list(s) for s in shapes]),
            "text": embeds[:, :length].half().contiguous(),       # fp16 halves the cache; features are O(1-100)
            "text_mask": mask[:, :length].contiguous(),
            "null_text": null[:, :length].half().contiguous(), "null_mask": null_mask[:, :length].contiguous(),
            "caption_image": torch.tensor(cap_image), "caption_score": torch.tensor(cap_score),
        }
        info = {"samples": len(latents), "captions": len(cap_text), "text_tokens": length,
                "buckets": {f"{h}x{w}": len(v) for (h, w), v in sorted(groups.items())},
                "skipped": skipped}
        cache.parent.mkdir(parents=True, exist_ok=True)
        # The key lives in the file's own metadata, so data and key are always replaced together.
        atomic_write(cache, lambda p: save_file(data, p, metadata={"key": key, "info": json.dumps(info)}))

    # ------------------------------------------------------------------------------------------------ steps

    def build_model(self) -> nn.Module:
        model = DiT(self.model_cfg)
        model.init_weights(self.opt.y_norm_init)   # NVlabs init (sana-spec §1.12)
        return model

    def batch(self, step: int, g: torch.Generator) -> dict[str, Tensor]:
        o, d = self.opt, self.data
        (h, w), idx = self.order(step)
        b = len(idx)
        u = torch.rand(b, generator=g, dtype=torch.float64)                 # one caption per image, by score
        chosen = torch.searchsorted(self.caption_keys, idx.double() + u, right=True)
        u = torch.sigmoid(o.logit_mean + o.logit_std * torch.randn(b, generator=g))    # logit-normal (§4.2)
        if o.discrete_time:
            u = (u * 1000).floor().clamp(max=999) / 1000                    # SANA's linspace(0, 0.999, 1000) grid
        t = shift_time(u, o.flow_shift)
        noise = torch.randn((b, self.model_cfg.in_channels, h, w), generator=g)
        drop = torch.rand(b, generator=g) < o.caption_dropout
        text, mask = d["text"][chosen].float(), d["text_mask"][chosen]
        text = torch.where(drop[:, None, None], d["null_text"].float(), text)
        mask = torch.where(drop[:, None], d["null_mask"], mask)
        # Cut the padding columns no caption of this batch uses: masked tokens get zero cross-attention weight
        # (exp(-10000) underflows to 0 in fp32), so only float summation order changes; it saves the kv projection of padding
        # (shapes captions: 13 tokens on average, 64 cached).
        length = int(mask.sum(1).max())
        text, mask = text[:, :length], mask[:, :length]
        batch = {"x0": d["latents"][idx][:, :, :h, :w], "noise": noise, "t": t, "text": text, "mask": mask}
        if o.loss_channels:
            batch["loss_channels"] = draw_channel_counts(o.loss_channels, b, g)        # (b,) channel counts
        return {k: self.env.local(v).to(self.env.device) for k, v in batch.items()}

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        t = batch["t"]
        x_t = flow_path(batch["x0"], batch["noise"], t)
        timestep = network_time(t, self.opt.discrete_time)                   # floor(1000 t) on SANA's grid (§4.2)
        v = model(x_t, timestep, batch["text"], batch["mask"])
        target = velocity_target(batch["x0"], batch["noise"])
        if "loss_channels" not in batch:
            return F.mse_loss(v.float(), target)                                       # plain MSE (§4.3)
        c = batch["loss_channels"]
        kept = (torch.arange(v.shape[1], device=v.device)[None] < c[:, None]).float()    # (b, C)
        err = (v.float() - target).square().mean((2, 3))                                 # (b, C)
        return ((err * kept).sum(1) / c).mean()            # each image: the MSE of its first c channels

    def export(self, model: nn.Module, folder: Path) -> None:
        from .hub import save_dit
        save_dit(model, folder)


def _pad_stack(latents: list[Tensor]) -> Tensor:
    h = max(z.shape[1] for z in latents)
    w = max(z.shape[2] for z in latents)
    return torch.stack([F.pad(z, (0, w - z.shape[2], 0, h - z.shape[1])) for z in latents])


def pipeline_from_run(run: str | Path, weights: str = "export", guidance: float = 4.5):
    """The whole text-to-image pipeline a DiT run trained for: its DiT, the frozen autoencoder and text encoder it
    was trained on, and the text settings and flow shift it used (run/config.json).

    weights: "export" = run/model (the EMA when the run keeps one); "raw" = the newest checkpoint's trained weights,
    "ema" = its EMA. At 3000 steps on the shapes data the raw weights sampled better than an EMA of decay 0.999
    (docs/bundled-model.md, eighth round), so both are worth evaluating. guidance: the pipeline's default scale."""
    from . import checkpoint
    from .hub import load_dcae, load_dit
    from .pipeline import Pipeline
    from .train import load_config
    if weights not in ("export", "raw", "ema"):
        raise ValueError(f"weights={weights!r}: one of 'export', 'raw', 'ema'")
    run = Path(run)
    cfg = load_config(run / "config.json")
    if cfg.task != "dit":
        raise ValueError(f"{run / 'config.json'}: a {cfg.task!r} run; a pipeline is assembled from a 'dit' run")
    o = cfg.options
    if not (run / "model").is_dir():
        raise FileNotFoundError(f"{run / 'model'}: no exported DiT yet (the run exports it when it finishes)")
    dit = load_dit(run / "model")
    if weights != "export":
        ckpt = checkpoint.latest(run)
        if ckpt is None:
            raise FileNotFoundError(f"{run / 'checkpoints'}: no complete checkpoint to take weights={weights!r} from")
        raw, ema, _, _ = checkpoint.load(ckpt)
        if weights == "ema" and ema is None:
            raise ValueError(f"{ckpt}: weights='ema', but this run kept no EMA (ema_decay 0)")
        dit.load_state_dict(raw if weights == "raw" else ema)
    return Pipeline(dit, load_dcae(o.vae), text_encoder(o), flow_shift=o.flow_shift, name=str(run), guidance=guidance)
