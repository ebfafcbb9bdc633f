"""Prompt -> text embedding -> noise -> sampler -> DC-AE decode -> image (diffusers-interop §4).

A `Pipeline` holds the three frozen networks and the flow shift; `generate` is the whole inference path.
One seed per image: image i depends on seeds[i] only, never on the batch it was made in, and a single image
with seed s starts from the same noise as diffusers' SanaPipeline with torch.Generator("cpu").manual_seed(s).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from .dcae import DCAE, DCAE_PRESETS
from .dit import DIT_PRESETS, DiT
from .files import atomic_write
from .flow import network_time
from .samplers import Callback, ModelFn, dpm_solver_2m, euler, flow_times, flow_times_euler, invert
from .text import TextConfig, TextEncoder

# name -> (sampler, time grid, integer network timesteps). The pairs are what diffusers' SanaPipeline does with
# DPMSolverMultistepScheduler (the official folders' scheduler) and FlowMatchEulerDiscreteScheduler (§3).
SAMPLERS: dict[str, tuple[Callable[..., Tensor], Callable[[int, float], Tensor], bool]] = {
    "dpm": (dpm_solver_2m, flow_times, True),
    "euler": (euler, flow_times_euler, False),
}


def trim_padding(text: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Drop the trailing text columns that every row masks out: (B, N, D), (B, N) -> (B, n, D), (B, n).

    A masked key gets a -10000 logit bias, and exp(-10000) is exactly 0 in every float dtype, so such columns
    never weigh in the cross-attention; dropping them changes only summation order and saves their key/value
    projections in every block at every step (the bundled model's prompts use ~13 of 64 tokens). A row with no
    real token at all attends uniformly to every column, so then nothing is dropped."""
    if mask is None or not bool(mask.any(1).all()):
        return text, mask
    n = int(mask.any(0).nonzero().max()) + 1
    # contiguous: on a strided view the projections' kernels (and last bits) would depend on the encoder's layout
    return text[:, :n].contiguous(), mask[:, :n].contiguous()              # (B, n, D), (B, n)


def dit_velocity(dit: DiT, text: Tensor, mask: Tensor | None, integer_t: bool) -> ModelFn:
    """The DiT as a model_fn over flow time t in [0, 1] (the network sees 1000 t, sana-spec §1.11)."""
    dtype = next(dit.parameters()).dtype
    text, mask = trim_padding(text, mask)
    ctx = dit.encode_text(text.to(dtype), mask, cache_kv=True)   # the caption's keys and values: once, not per step

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        timestep = network_time(t, integer_t) * dit.cfg.timestep_scale
        return dit.denoise(x.to(dtype), timestep, ctx).float()
    return model_fn


def velocity_pair(dit: DiT, text: Tensor, mask: Tensor, null_text: Tensor, null_mask: Tensor,
                  integer_t: bool) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(x, t) -> (v_null, v_text): both branches in one batched call, ordered [null, text] as diffusers."""
    both = dit_velocity(dit, torch.cat([null_text, text]), torch.cat([null_mask, mask]), integer_t)

    def pair_fn(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        v_null, v_text = both(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        return v_null, v_text
    return pair_fn


def classifier_free(dit: DiT, text: Tensor, mask: Tensor, null_text: Tensor, null_mask: Tensor,
                    scale: float, integer_t: bool) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans, arXiv 2207.12598) as one batched model_fn.

    v = v_null + scale * (v_text - v_null). scale == 1 is the conditional model alone (one call)."""
    if scale == 1:
        return dit_velocity(dit, text, mask, integer_t)
    pair = velocity_pair(dit, text, mask, null_text, null_mask, integer_t)

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        v_null, v_text = pair(x, t)
        return v_null + scale * (v_text - v_null)
    return model_fn


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> Tensor:
    """(len(seeds), *shape) float32 on CPU; row i = torch.randn(shape) from Generator("cpu").manual_seed(seeds[i])."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(int(s)))
                      for s in seeds])


# SANA's aspect-ratio bins (PixArt's tables, used by diffusers' SanaPipeline; interop §4.4). All four tables are one
# table scaled: (h, w) in units of native/16 px, mirrored, ratio keys h/w rounded to 2 decimals. The mirror of
# 0.52 (1.91) is in none of them, and the 512 and 1024 tables lack seven extreme ratios the larger ones have.
_BIN_UNITS = ((8, 32), (8, 31), (8, 30), (8, 29), (9, 28), (9, 27), (9, 26), (10, 25), (10, 24), (11, 23), (11, 22),
              (11, 21), (12, 21), (12, 20), (13, 19), (13, 18), (14, 18), (14, 17), (15, 17), (15, 16), (16, 16))
_NOT_BELOW_2K = {"0.26", "0.27", "2.89", "3.11", "3.62", "3.75", "3.88"}


def aspect_ratio_bins(native: int) -> dict[str, tuple[int, int]]:
    """{"h/w ratio": (height, width)} for a model of native resolution 512, 1024, 2048 or 4096, ratio ascending."""
    if native not in (512, 1024, 2048, 4096):
        raise ValueError(f"native resolution {native}: SANA has aspect-ratio bins for 512, 1024, 2048 and 4096 only")
    unit = native // 16
    pairs = list(_BIN_UNITS) + [(w, h) for h, w in reversed(_BIN_UNITS[:-1])]
    bins = {str(round(h / w, 2)): (h * unit, w * unit) for h, w in pairs}
    return {k: v for k, v in bins.items() if k != "1.91" and (native >= 2048 or k not in _NOT_BELOW_2K)}


def snap_to_bin(height: int, width: int, native: int) -> tuple[int, int]:
    """The bin whose ratio key is nearest to height / width (the first on ties), as diffusers' classify_height_width_bin."""
    bins = aspect_ratio_bins(native)
    return bins[min(bins, key=lambda k: abs(float(k) - height / width))]


def resize_and_crop(images: Tensor, height: int, width: int) -> Tensor:
    """Scale (bilinear) so that both sides cover (height, width), then centre-crop: back from the bin's size."""
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images
    ratio = max(height / h, width / w)
    rh, rw = int(h * ratio), int(w * ratio)
    images = torch.nn.functional.interpolate(images, size=(rh, rw), mode="bilinear", align_corners=False)
    top, left = (rh - height) // 2, (rw - width) // 2
    return images[..., top:top + height, left:left + width]


def _finite_number(value) -> bool:
    """A guidance scale: an int or float (not a bool), finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """One generation call; validates itself so that errors name the parameter."""
    prompts: tuple[str, ...]
    negative_prompt: str = ""
    height: int = 1024
    width: int = 1024
    steps: int = 20
    guidance: float | None = None           # None: the pipeline's own default (Pipeline.guidance)
    seeds: tuple[int, ...] = (0,)           # one per image: len(prompts) * images_per_prompt
    sampler: str = "dpm"
    images_per_prompt: int = 1
    resolution_binning: bool = False        # generate at the nearest SANA aspect-ratio bin, then resize and crop

    def __post_init__(self):
        if not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            raise ValueError(f"prompts={self.prompts!r}: need at least one prompt, each a str")
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
            if value % 32 and not self.resolution_binning:
                raise ValueError(f"{name}={value}: must be a multiple of 32 (the DC-AE downsamples by 32), "
                                 f"or ask for resolution_binning")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r}: must be an integer >= 1")
        if self.guidance is not None and not _finite_number(self.guidance):
            raise ValueError(f"guidance={self.guidance!r}: must be a finite number")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r}: must be one of {sorted(SAMPLERS)}")
        if not isinstance(self.images_per_prompt, int) or self.images_per_prompt < 1:
            raise ValueError(f"images_per_prompt={self.images_per_prompt!r}: must be an integer >= 1")
        n = len(self.prompts) * self.images_per_prompt
        if len(self.seeds) != n:
            raise ValueError(f"seeds: got {len(self.seeds)} seeds for {n} images "
                             f"({len(self.prompts)} prompts x images_per_prompt={self.images_per_prompt})")


# ----------------------------------------------------------------------------------------------------------------
# What a saved folder holds besides the networks


# model_index.json key of our TextConfig. diffusers drops "_"-prefixed keys before building a pipeline from
# model_index.json (ConfigMixin.extract_init_dict), so the folder stays a plain SanaPipeline folder for it.
TEXT_CONFIG_KEY = "_sanaflow_text_config"
# model_index.json key of the model's default guidance scale (Pipeline.guidance): SANA's 4.5 suits the official
# models; the bundled shapes model samples best without guidance (docs/bundled-model.md), so each folder says.
GUIDANCE_KEY = "_sanaflow_guidance"


def _guidance_from_index(index: dict, path: Path) -> float:
    from .hub import CheckpointError
    value = index.get(GUIDANCE_KEY, 4.5)
    if not _finite_number(value):
        raise CheckpointError(f"{path}: {GUIDANCE_KEY}={value!r} must be a finite number")
    return float(value)


def _text_config_from_index(index: dict, path: Path) -> TextConfig:
    """The TextConfig stored by `Pipeline.save_pretrained`, or TextConfig() for folders without one."""
    from .hub import CheckpointError
    stored = index.get(TEXT_CONFIG_KEY)
    if stored is None:
        return TextConfig()
    fields = {f.name for f in dataclasses.fields(TextConfig)}
    if not isinstance(stored, dict) or set(stored) - fields:
        raise CheckpointError(f"{path}: {TEXT_CONFIG_KEY} must be an object with fields from {sorted(fields)}, "
                              f"got {stored!r}")
    for name in ("lowercase", "negative_uses_prompt_mask"):
        if name in stored and not isinstance(stored[name], bool):     # "false" would be truthy
            raise CheckpointError(f"{path}: {TEXT_CONFIG_KEY}.{name}={stored[name]!r} must be true or false")
    try:
        return TextConfig(**stored)                 # validates max_length and chi; a list chi becomes a tuple
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {TEXT_CONFIG_KEY}: {e}") from e


def dpm_scheduler_config(flow_shift: float) -> dict:
    """scheduler/scheduler_config.json of the official SANA folders: DPMSolverMultistepScheduler with flow sigmas,
    made by diffusers' scripts/convert_sana_to_diffusers.py as DPMSolverMultistepScheduler(flow_shift=...,
    use_flow_sigmas=True, prediction_type="flow_prediction") (interop §3), i.e. our `SAMPLERS["dpm"]`.

    Every field is written, with diffusers 0.42.1's values, as diffusers' save_config does: the folder keeps
    meaning Flow-DPM-Solver 2M whatever later diffusers releases change in their defaults."""
    from .hub import DIFFUSERS_VERSION
    return {
        "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        # The three settings that make it SANA's Flow-DPM-Solver:
        "use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": float(flow_shift),
        # DPM-Solver++ 2M, first order at the last step, ending at sigma 0 (interop §3.1):
        "algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True,
        "euler_at_final": False, "final_sigmas_type": "zero", "num_train_timesteps": 1000,
        # Defaults that flow sigmas make irrelevant (betas, sigma spacings, thresholding), as diffusers writes them:
        "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "trained_betas": None,
        "dynamic_thresholding_ratio": 0.995, "thresholding": False, "sample_max_value": 1.0,
        "lambda_min_clipped": float("-inf"), "rescale_betas_zero_snr": False, "steps_offset": 0,
        "time_shift_type": "exponential", "timestep_spacing": "linspace", "use_beta_sigmas": False,
        "use_dynamic_shifting": False, "use_exponential_sigmas": False, "use_karras_sigmas": False,
        "use_lu_lambdas": False, "variance_type": None,
    }


def _library_class(part) -> list[str]:
    """[library, class] of a text component for model_index.json. sanaflow.gemma's transformers-free Gemma-2 and
    tokenizer give the transformers classes their saved folders are for (`hub_class`)."""
    return list(getattr(part, "hub_class", (type(part).__module__.split(".")[0], type(part).__name__)))


class Pipeline:
    def __init__(self, dit: DiT, vae: DCAE, text: TextEncoder, flow_shift: float = 3.0, name: str = "",
                 guidance: float = 4.5):
        """guidance: this model's default classifier-free guidance scale (for requests that give none)."""
        if dit.cfg.in_channels != vae.cfg.latent_channels:
            raise ValueError(f"dit.in_channels={dit.cfg.in_channels} != vae.latent_channels={vae.cfg.latent_channels}")
        if not _finite_number(guidance):
            raise ValueError(f"guidance={guidance!r}: must be a finite number")
        self.dit, self.vae, self.text, self.flow_shift, self.name = dit, vae, text, flow_shift, name
        self.guidance = float(guidance)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32, variant: str | None = None,
                        text_config: TextConfig | None = None) -> Pipeline:
        """A local diffusers-format SANA folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
        scheduler/). Never touches the network.

        text_config: None takes the one `save_pretrained` stored in model_index.json, else TextConfig() (diffusers'
        text handling, what official folders were converted for); a TextConfig given here wins over both."""
        from .hub import detect_variant, load_dcae, load_dit, read_json
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder not found: {folder}")
        index = read_json(folder / "model_index.json")
        missing = [c for c in ("transformer", "vae", "text_encoder", "tokenizer") if not (folder / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"{folder}: missing component folders {missing} (model_index.json lists "
                                    f"{sorted(k for k in index if not k.startswith('_'))})")
        if text_config is None:
            text_config = _text_config_from_index(index, folder / "model_index.json")
        scheduler = folder / "scheduler" / "scheduler_config.json"
        sched = read_json(scheduler) if scheduler.is_file() else {}
        shift = sched.get("flow_shift", sched.get("shift", 3.0))   # DPMSolverMultistep / FlowMatchEuler field names
        return cls(load_dit(folder / "transformer", dtype, variant), load_dcae(folder / "vae", dtype, variant),
                   TextEncoder.from_pretrained(folder / "text_encoder", folder / "tokenizer", dtype=dtype,
                                               config=text_config,
                                               variant=variant or detect_variant(folder / "text_encoder", "model")),
                   flow_shift=float(shift), name=str(folder),
                   guidance=_guidance_from_index(index, folder / "model_index.json"))

    def save_pretrained(self, folder: str | Path) -> Path:
        """This pipeline as a diffusers SanaPipeline folder (interop §5), loadable by diffusers'
        `SanaPipeline.from_pretrained` and by `Pipeline.from_pretrained`: model_index.json, transformer/, vae/,
        text_encoder/ and tokenizer/ (transformers' save_pretrained, safetensors), scheduler/ (Flow-DPM-Solver with
        this pipeline's flow shift, as in the official folders). Each network keeps its dtype.

        The TextConfig goes into model_index.json under "_sanaflow_text_config", which diffusers ignores: diffusers
        always encodes prompts as TextConfig() does, so only with that config do both give the same images.
        The folder is written as a whole beside `folder` and renamed into place (`hub.write_folder_atomic`)."""
        from .hub import DIFFUSERS_VERSION, save_dcae, save_dit, write_folder_atomic, write_json
        from .keymaps import dit_config_to_diffusers
        try:
            dit_config_to_diffusers(self.dit.cfg)      # refuse before writing anything, naming `folder`
        except ValueError as e:
            raise ValueError(f"{folder}: {e}") from e
        model, tokenizer = self.text.model, self.text.tokenizer
        for name, part in (("text encoder", model), ("tokenizer", tokenizer)):
            if not callable(getattr(part, "save_pretrained", None)):
                raise TypeError(f"{folder}: the {name} ({type(part).__name__}) has no save_pretrained; a SANA "
                                f"folder needs a transformers model and tokenizer")
        index = {
            "_class_name": "SanaPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            # [library, class] per component, what diffusers imports to load each folder.
            "transformer": ["diffusers", "SanaTransformer2DModel"], "vae": ["diffusers", "AutoencoderDC"],
            "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
            "text_encoder": _library_class(model), "tokenizer": _library_class(tokenizer),
            TEXT_CONFIG_KEY: dataclasses.asdict(self.text.config), GUIDANCE_KEY: self.guidance,
        }

        def write(tmp: Path) -> None:
            save_dit(self.dit, tmp / "transformer")
            save_dcae(self.vae, tmp / "vae")
            model.save_pretrained(tmp / "text_encoder")            # safetensors (the only format of transformers 5)
            tokenizer.save_pretrained(tmp / "tokenizer")
            write_json(tmp / "scheduler" / "scheduler_config.json", dpm_scheduler_config(self.flow_shift))
            write_json(tmp / "model_index.json", index)

        return write_folder_atomic(folder, write)

    @property
    def native_size(self) -> int:
        """The training resolution: the DiT's latent sample_size times the autoencoder's compression."""
        return self.dit.cfg.sample_size * self.vae.cfg.compression

    def guidance_of(self, req: GenerateRequest) -> float:
        """The guidance scale a request runs at: its own, else this model's default."""
        return float(self.guidance if req.guidance is None else req.guidance)

    def _guided_velocity(self, req: GenerateRequest, integer_t: bool) -> ModelFn:
        """The request's prompts, negative prompt and guidance as one model_fn over flow time."""
        c = self.text.encode_for_cfg(list(req.prompts), req.negative_prompt, req.images_per_prompt)
        return classifier_free(self.dit, c.text, c.text_mask, c.null_text, c.null_mask, self.guidance_of(req),
                               integer_t)

    def latent_shape(self, req: GenerateRequest) -> tuple[int, int, int]:
        """(C, h, w) of the request's latents: its size, snapped to an aspect-ratio bin if it asks for binning."""
        f = self.vae.cfg.compression
        # Bins are chosen by the DiT's sample_size as diffusers does (16, 32, 64, 128 -> the 512 ... 4096 tables).
        height, width = snap_to_bin(req.height, req.width, 32 * self.dit.cfg.sample_size) if req.resolution_binning \
            else (req.height, req.width)
        if height % f or width % f:
            raise ValueError(f"height={height}, width={width}: must be multiples of {f} for this autoencoder")
        return self.dit.cfg.in_channels, height // f, width // f

    @torch.no_grad()
    def generate(self, req: GenerateRequest, latents: Tensor | None = None, callback: Callback | None = None,
                 output: str = "image") -> Tensor:
        """Images (B, 3, H, W) in [0, 1] (or the final latents with output="latent")."""
        sampler, grid, integer_t = SAMPLERS[req.sampler]
        shape = self.latent_shape(req)
        model_fn = self._guided_velocity(req, integer_t)
        if latents is None:
            latents = initial_noise(req.seeds, shape)
        elif tuple(latents.shape) != (len(req.seeds), *shape):
            raise ValueError(f"latents: shape {tuple(latents.shape)} != {(len(req.seeds), *shape)}")
        device = next(self.dit.parameters()).device
        x = sampler(model_fn, latents.float().to(device), grid(req.steps, self.flow_shift).to(device), callback)
        return x if output == "latent" else self.decode(x, req.height, req.width)

    @torch.no_grad()
    def decode(self, latents: Tensor, height: int, width: int) -> Tensor:
        """Final latents (B, C, h, w) -> images (B, 3, height, width) in [0, 1] (resized and cropped if binned)."""
        vae_dtype = next(self.vae.parameters()).dtype
        images = resize_and_crop(self.vae.decode(latents.to(vae_dtype)).float(), height, width)
        return (images * 0.5 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def invert(self, req: GenerateRequest, latents: Tensor, callback: Callback | None = None) -> Tensor:
        """Latents (B, C, h, w) -> the noise the sampler would turn into them: the same solver and grid run backwards
        (t: 0 -> 1) in fp32 with the request's prompts and guidance (guidance 1 is the usual choice)."""
        sampler, grid, integer_t = SAMPLERS[req.sampler]
        if len(latents) != len(req.seeds):
            raise ValueError(f"latents: {len(latents)} rows for {len(req.seeds)} images of the request")
        model_fn = self._guided_velocity(req, integer_t)
        device = next(self.dit.parameters()).device
        return invert(sampler, model_fn, latents.to(device), grid(req.steps, self.flow_shift).to(device), callback)


def save_png(image: Tensor, path: str | Path, metadata: dict | None = None) -> None:
    """(3, H, W) in [0, 1] -> PNG with `metadata` as text chunks; written atomically (temp file + rename)."""
    from PIL import Image, PngImagePlugin
    path = Path(path)
    array = (image.permute(1, 2, 0).float().cpu().numpy() * 255).round().clip(0, 255).astype("uint8")
    info = PngImagePlugin.PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(str(k), v if isinstance(v, str) else json.dumps(v))
    atomic_write(path, lambda p: Image.fromarray(array).save(p, format="PNG", pnginfo=info))


# ----------------------------------------------------------------------------------------------------------------
# The default model


BUNDLED = Path(__file__).parent / "assets" / "model"


def random_pipeline(seed: int = 0) -> Pipeline:
    """A small SANA-shaped pipeline with random weights (32x DC-AE, linear DiT, tiny Gemma-2). It draws noise-like
    images, not pictures: it exists so that the whole path runs before any trained model is present."""
    from transformers import Gemma2Config, Gemma2Model
    from .text import CHI_DIFFUSERS, simple_tokenizer
    with torch.random.fork_rng(devices=[]):      # do not disturb the caller's global RNG
        torch.manual_seed(seed)
        dit_cfg = dataclasses.replace(DIT_PRESETS["small"], depth=2)
        dit = DiT(dit_cfg)
        dit.init_weights()
        vae = DCAE(DCAE_PRESETS["small"])
        tok = simple_tokenizer(re.findall(r"[A-Za-z]+", " ".join(CHI_DIFFUSERS)))
        gemma = Gemma2Model(Gemma2Config(vocab_size=len(tok), hidden_size=dit_cfg.caption_channels, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                         intermediate_size=2 * dit_cfg.caption_channels,
                                         attn_implementation="eager"))
    text = TextEncoder(gemma.eval().requires_grad_(False), tok, TextConfig())
    return Pipeline(dit.eval().requires_grad_(False), vae.eval().requires_grad_(False), text, name="random-small")


def load_default() -> Pipeline:
    """The bundled model if the package ships one, else the random pipeline (callers say so to the user)."""
    if (BUNDLED / "model_index.json").is_file():
        return Pipeline.from_pretrained(BUNDLED)
    return random_pipeline()
