"""One training loop for SANA's three networks: the linear DiT, the DC-AE and the text encoder (sana-spec §4).

What differs between them (data, model, loss, export format) is a *task* (train_dit.py, train_dcae.py,
train_text.py); the loop below is the same for all: AdamW, linear warm-up then constant LR (§4.5), global
grad-norm clipping, optional EMA (§4.6), autocast on GPU, DDP/FSDP under torchrun, a NaN/inf guard, JSONL logs
and atomic safetensors checkpoints.

Resuming is rerunning: every random choice of step s (which samples, which captions, t, noise, dropout) is drawn
from a generator seeded by (seed, s), so the batch of step s does not depend on where the run was restarted, and
the checkpoint holds everything else (weights, EMA, optimizer moments). N steps in one go and k + (N - k) steps
give identical parameters on CPU. Each rank takes its slice of the same global batch, so the number of processes
does not change what is trained on.

CAME (§4.4) is not used: its only package, came-pytorch, has had one release (2023); AdamW is the fallback the
NVlabs configs also ship.
"""
from __future__ import annotations

import atexit
import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import checkpoint
from .files import atomic_write, write_json_atomic


class DataError(ValueError):
    """A data set that cannot be trained on (missing, empty, too small); raised before any training work."""


class TrainingError(RuntimeError):
    """Training stopped (e.g. a non-finite loss); the message says which checkpoint is the last good one."""


# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class TrainConfig:
    task: str                               # "dit", "dcae" or "text"
    data: str                               # data set folder: shapes/WebDataset shards, a sample folder, an image folder
    model: Any = "small"                    # a preset name of the task's model, or a dict of config fields
    options: Any = field(default_factory=dict)   # the task's own settings (its Options dataclass, or a dict of fields)
    steps: int = 1000
    batch_size: int = 32                    # global: summed over all processes
    lr: float = 1e-4                        # sana-spec §4.4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0                   # linear warm-up, then constant (§4.5)
    decay_steps: int = 0                    # then linear decay to 0 over the run's last decay_steps (0 = none); see lr_at
    grad_clip: float = 0.1                  # global grad-norm (§4.5); 0 = off
    ema_decay: float = 0.0                  # 0 = no EMA (§4.6: SANA's train.py builds none)
    seed: int = 0
    save_every: int = 500                   # steps between checkpoints; the last step is always saved
    log_every: int = 10
    keep: int = 2                           # checkpoints kept
    precision: str = "fp32"                 # "bf16" / "fp16": autocast on CUDA (fp32 master weights); CPU runs fp32
    grad_checkpointing: bool = False        # per-block activation checkpointing (§4.11), where the model has blocks
    parallel: str = "ddp"                   # under torchrun: "ddp", or "fsdp" (FSDP2 per block) for large models

    def __post_init__(self):
        def positive(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name}={v!r}: must be a positive int")
        for name in ("steps", "batch_size", "save_every", "log_every", "keep"):
            positive(name)
        if self.task not in TASK_NAMES:
            raise ValueError(f"TrainConfig.task={self.task!r}: one of {sorted(TASK_NAMES)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr={self.lr!r}: must be a positive number")
        if self.warmup_steps < 0 or self.decay_steps < 0 or self.grad_clip < 0 or not 0 <= self.ema_decay < 1:
            raise ValueError(f"TrainConfig: warmup_steps={self.warmup_steps}, decay_steps={self.decay_steps}, "
                             f"grad_clip={self.grad_clip} must be >= 0 and ema_decay={self.ema_decay} in [0, 1)")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"TrainConfig.precision={self.precision!r}: one of fp32, bf16, fp16")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"TrainConfig.parallel={self.parallel!r}: one of ddp, fsdp")
        object.__setattr__(self, "betas", tuple(self.betas))
        options_cls = task_class(self.task).Options
        if isinstance(self.options, dict):
            known = {f.name for f in dataclasses.fields(options_cls)}
            unknown = sorted(set(self.options) - known)
            if unknown:
                raise ValueError(f"TrainConfig.options: unknown fields {unknown} for task {self.task!r}; "
                                 f"known: {sorted(known)}")
            object.__setattr__(self, "options", options_cls(**self.options))
        elif not isinstance(self.options, options_cls):
            raise TypeError(f"TrainConfig.options: expected {options_cls.__name__} for task {self.task!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"training config: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> TrainConfig:
        """dataclasses.replace that also accepts "options.<field>" keys."""
        opts = {k.split(".", 1)[1]: v for k, v in changes.items() if k.startswith("options.")}
        top = {k: v for k, v in changes.items() if not k.startswith("options.")}
        if opts:
            top["options"] = dataclasses.replace(top.get("options", self.options), **opts)
        return dataclasses.replace(self, **top)


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


TASK_NAMES = ("dit", "dcae", "text")


def model_config(model, presets: dict, cls):
    """TrainConfig.model for a model with a frozen-dataclass config `cls`: a preset name of `presets`, or a dict of
    `cls` fields, optionally with "preset" naming the preset it changes."""
    if isinstance(model, str):
        if model not in presets:
            raise ValueError(f"model={model!r}: not a {cls.__name__} preset; one of {sorted(presets)}")
        return presets[model]
    if not isinstance(model, dict):
        raise TypeError(f"model={model!r}: expected a preset name or a dict of {cls.__name__} fields")
    fields = dict(model)
    base = model_config(fields.pop("preset"), presets, cls) if "preset" in fields else cls()
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"model: unknown {cls.__name__} fields {unknown}")
    return dataclasses.replace(base, **fields)

# Named training runs. The shapes-* trio is the bundled model's recipe (docs/training.md); data and the upstream
# model folders are paths relative to the working directory, overridable on the command line.
TRAIN_PRESETS: dict[str, dict] = {
    # 256 px images, 32x compression: 8x8x32 latents. At 128 px (4x4 latents) the AE reached 27.8 dB on held-out
    # renders after 26k images, but the evaluator passed on 4 % of its reconstructions: small hexagons, stars and
    # crosses came back as blobs (docs/bundled-model.md). At 256 px every shape covers 4x the latent cells.
    # The AE trains on 128 px crops of the 256 px images (options.crop): a quarter of the cost per image.
    # ResBlock stages only and lr 3e-4, chosen by measurement on 2 CPU cores, 1 thread:
    #   - the preset's EfficientViT stages ran at 9 img/s with loss spikes;
    #   - ResBlock-only stages ran at 15 img/s;
    #   - lr 1e-3 spiked where 3e-4 did not.
    # latent_l2 keeps the latents near unit scale: without it they drifted to std ~2000.
    # No EMA: at step 3600 an EMA of decay 0.999 reconstructed worse than the weights (31.1 vs 33.1 dB, evaluator
    # ratio 0.60 vs 0.69), still carrying the first 2000 steps and a loss spike at step 1930.
    # The last steps decay the LR to 0: from the stable run's step 3600, evaluator ratio 0.685 -> 0.773 and PSNR
    # 33.15 -> 34.12 dB on 260 held-out renders (benchmarks/ae_eval.py), for 7 more minutes.
    # decode_margin 1: the decoder's outermost pixels lag far behind its interior (dcae.DCAE.decode); decoding
    # with one replicated latent cell per side removes the error (training itself never calls decode).
    # anchor: the first 12 latent channels carry each cell's pooled colours less the image's median, so that an
    # object's colour moves the latent as much as its shape does (train_dcae.DCAEOptions.anchor).
    # shapes-256-g8: object centres on an 8 x 8 grid of cells (`sanaflow data shapes --grid 8`), one per latent cell.
    # On it 2400 steps (~17 min) gave evaluator ratio 0.815 and 34.45 dB on the grid's held-out renders (ninth
    # round); 3600 steps with a 600-step cool-down (~30 min) give 0.892 and 35.96 dB, crosses read as squares 9 -> 1
    # and hexagons read as discs 34 -> 23 of 260 renders (docs/bundled-model.md, fourteenth round).
    "shapes-dcae": dict(task="dcae", data="data/shapes-256-g8",
                        model={"preset": "small", "widths": [8, 16, 32, 64, 128, 128], "vit_stages": [False] * 6,
                               "qkv_multiscales": [[]] * 6, "decode_margin": 1},
                        steps=3600, decay_steps=600, batch_size=16, lr=3e-4, warmup_steps=100, grad_clip=1.0,
                        save_every=200,
                        options={"resolution": 256, "crop": 128, "eval_samples": 200, "stats_samples": 256,
                                 "latent_l2": 1e-3, "anchor": 1.0, "anchor_gain": 2.0}),
    # The text encoder reads captions only; shapes-128-g8 holds the same captions as shapes-256-g8 (same seeds).
    # corpus: the held-out split's captions, text only, standing in for an LLM's pretraining text (the words
    # "disc", "plus sign", ... of held-out prompts; train_text.py). 800 steps: twice the text of the 500 before.
    # pair_captions: the corpus alone taught those words' tokens, not their meaning (a shape probe fitted on the
    # training words scored 0.000 on "disc"/"plus sign"); with pairs of captions of one scene it scored 1.000
    # (benchmarks/text_binding.py; docs/bundled-model.md, tenth round).
    "shapes-text": dict(task="text", data="data/shapes-128-g8", model="small", steps=800, batch_size=64, lr=1e-3,
                        warmup_steps=200, grad_clip=1.0, save_every=250,
                        options={"corpus": "data/shapes-64-heldout", "pair_captions": True}),
    # text_max_length 64 = the text encoder's training length; shapes captions run up to ~73 tokens (13 on average).
    # Patch size 1 and width 128 on the 8x8 latents: 64 tokens, one per latent cell, so one token per object on the
    # --grid 8 data, at the per-image cost of patch 2 and width 256 (16 tokens). SANA's released models are P1 too
    # (AE-F32C32P1, paper §2.1.2). At equal steps the training-split score rose from 0.394 (patch 2) to 0.495, two
    # objects 12/40 -> 23/40 (thirteenth round).
    # y_norm_init 1.0, not SANA's 0.01 (meant for Gemma-2-2B's large features; ours have RMS ~1): with 0.01 the
    # cross-attention stayed near-uniform for 6500 steps. At step 3000, held-out GenEval images passed 16/520
    # against 5/520 (docs/bundled-model.md). 9000 steps, the last 2000 cooling the LR to 0: the DiT was undertrained
    # at 3000-6500 constant-LR steps, and the cool-down alone doubled its score (ninth and tenth rounds).
    # lr 1e-3: at 5e-4 the loss was still falling at 9000 steps; 1e-3 was lower at every step (0.185 vs 0.193 over the
    # last 250) and raised the training-split score from 0.335 to 0.394, held-out 0.159 -> 0.284 (twelfth round).
    "shapes-dit": dict(task="dit", data="data/shapes-256-g8",
                       model={"preset": "small", "sample_size": 8, "patch_size": 1, "width": 128},
                       steps=9000, decay_steps=2000,
                       batch_size=64, lr=1e-3, warmup_steps=300, grad_clip=1.0, save_every=250, ema_decay=0.999,
                       options={"vae": "runs/shapes-dcae/model", "text_encoder": "runs/shapes-text/model",
                                "text_max_length": 64, "chi": False, "resolution": 256, "caption_dropout": 0.1,
                                "caption_rule": "softmax", "caption_temperature": 0.5, "y_norm_init": 1.0}),
}


def preset(name: str) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        raise ValueError(f"preset={name!r}: one of {sorted(TRAIN_PRESETS)}")
    return TrainConfig(**TRAIN_PRESETS[name])



def task_class(name: str):
    # Imported on demand: the task modules import this one (DataError, BatchOrder, ...), and a run needs only one.
    if name == "dit":
        from .train_dit import DiTTask
        return DiTTask
    if name == "dcae":
        from .train_dcae import DCAETask
        return DCAETask
    if name == "text":
        from .train_text import TextTask
        return TextTask
    raise ValueError(f"task={name!r}: one of {list(TASK_NAMES)}")


class Task(Protocol):
    """What the loop needs from a model family. All randomness of a step comes from the generator it is given."""
    Options: type

    def __init__(self, cfg: TrainConfig, run: Path, env: "DistEnv"): ...
    def prepare(self) -> dict: ...                      # read data / build caches; DataError if unusable
    def build_model(self) -> nn.Module: ...             # a freshly initialised model (global torch seed is set)
    def batch(self, step: int, g: torch.Generator) -> dict[str, Tensor]: ...   # this rank's slice of batch `step`
    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor: ...
    def export(self, model: nn.Module, folder: Path) -> None: ...          # the loadable model, written atomically


def open_dataset(path: str | Path):
    """A reader for a data folder: WebDataset shards (*.tar) or a folder of images with .json/.txt captions (which
    includes `sanaflow data shapes --format folder`). DataError if the folder is missing."""
    from .data import read_image_folder, read_wds
    path = Path(path)
    if path.is_file() and path.suffix == ".tar":
        return read_wds(path)
    if not path.is_dir():
        raise DataError(f"data={str(path)!r}: no such folder (make one with `sanaflow data shapes --out {path}`)")
    return read_wds(path) if any(path.glob("*.tar")) else read_image_folder(path)


def fingerprint(path: str | Path) -> str:
    """Names, sizes and mtimes of the files under `path` (or of one file): a data set or model folder rewritten
    in place gets a new fingerprint, and so a rebuilt cache."""
    path = Path(path)
    if not path.exists():
        return "missing"
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    listing = [(str(f.relative_to(path) if path.is_dir() else f.name), f.stat().st_size, f.stat().st_mtime_ns)
               for f in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def cache_metadata(path: Path) -> dict:
    """The metadata of a safetensors cache file, or {} if it is missing, cut short by a crash or unreadable (the
    caller then rebuilds it). Caches keep their key in this metadata, so data and key are replaced together."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError):
        return {}


# ----------------------------------------------------------------------------------------------------------------
# Deterministic data order and per-step randomness


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for (seed, step, stream), well mixed so that nearby seeds and steps are unrelated."""
    state = np.random.SeedSequence([int(seed), int(step), int(stream)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class BatchOrder:
    """Which samples form global batch `step`: epochs of shuffled batches, each drawn from one bucket (all samples
    of a batch share a shape, sana-spec §4.9). A pure function of (seed, step); incomplete batches are dropped."""

    def __init__(self, buckets: dict[Any, Tensor], batch_size: int, seed: int):
        self.buckets = {k: torch.as_tensor(v, dtype=torch.long) for k, v in sorted(buckets.items())}
        self.batch_size, self.seed = batch_size, seed
        self.per_epoch = sum(len(v) // batch_size for v in self.buckets.values())
        if self.per_epoch == 0:
            sizes = {str(k): len(v) for k, v in self.buckets.items()}
            raise DataError(f"batch_size={batch_size} is larger than every bucket of the data set {sizes}")
        self._epoch, self._batches = -1, []

    def epoch_batches(self, epoch: int) -> list[tuple[Any, Tensor]]:
        if epoch != self._epoch:
            g = step_generator(self.seed, epoch, stream=1)
            batches = []
            for key, idx in self.buckets.items():
                perm = idx[torch.randperm(len(idx), generator=g)]
                n = len(idx) // self.batch_size * self.batch_size
                batches += [(key, b) for b in perm[:n].split(self.batch_size)]
            self._batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
            self._epoch = epoch
        return self._batches

    def position(self, step: int) -> dict:
        epoch, index = divmod(step, self.per_epoch)
        return {"epoch": epoch, "batch_in_epoch": index, "batches_per_epoch": self.per_epoch}

    def __call__(self, step: int) -> tuple[Any, Tensor]:
        epoch, index = divmod(step, self.per_epoch)
        return self.epoch_batches(epoch)[index]


def caption_weights(scores: Tensor, rule: str, temperature: float, threshold: float) -> Tensor:
    """Sampling weights over one image's captions from their scores (sana-spec §4.8).

    "clipscore": the NVlabs code (weighted_sample_clipscore): keep scores >= threshold, weight s^(1/T); if none
      passes, the best caption. "softmax": the paper's formula, exp(s / T). "uniform": all equal. "best": argmax."""
    if rule == "uniform":
        return torch.ones_like(scores)
    if rule == "best":
        return (scores == scores.max()).float()
    if rule == "softmax":
        return torch.softmax(scores / temperature, 0)
    if rule == "clipscore":
        keep = scores >= threshold
        if not keep.any():
            return (scores == scores.max()).float()
        return torch.where(keep, scores.clamp_min(1e-12) ** (1 / temperature), torch.zeros_like(scores))
    raise ValueError(f"caption rule {rule!r}: one of clipscore, softmax, uniform, best")


def channel_counts(name: str, counts, channels: int | None = None) -> tuple[int, ...]:
    """A list of latent channel counts from a config (DC-AE 1.5's structured latent, arXiv 2508.00413), checked:
    each in 1..channels. ValueError naming options.`name`."""
    counts = tuple(counts)                                                # JSON gives a list
    if not all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= (channels or c) for c in counts):
        limit = f" and <= {channels}, the latent's channels" if channels else ""
        raise ValueError(f"options.{name}={list(counts)}: must be channel counts >= 1{limit}")
    return counts


def draw_channel_counts(counts: tuple[int, ...], n: int, g: torch.Generator) -> Tensor:
    """(n,) counts drawn uniformly from `counts` with the step's generator: one per image of the global batch."""
    return torch.tensor(counts)[torch.randint(0, len(counts), (n,), generator=g)]


# ----------------------------------------------------------------------------------------------------------------
# Processes


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def local(self, x: Tensor) -> Tensor:
        """This rank's contiguous slice of a global-batch tensor."""
        return x.chunk(self.world)[self.rank]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def on_main(self, fn) -> None:
        """Run fn() on rank 0 only (e.g. build a cache), the others waiting. If it raises, every rank raises, instead
        of the others waiting at a barrier until torchrun kills them."""
        error = None
        if self.main:
            try:
                fn()
            except Exception as e:       # re-raised below, after telling the other ranks
                error = e
        if self.world > 1:
            failed = torch.tensor([int(error is not None)], device=self.device)
            dist.all_reduce(failed)      # also the barrier
            if failed.item() and error is None:
                raise RuntimeError("rank 0 failed while preparing the run; its error says why")
        if error is not None:
            raise error

    def close(self) -> None:
        """Leave the process group. A gloo process that exits while still in it can abort (SIGABRT) when the
        interpreter tears down the group's worker threads, failing a run that trained fine."""
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def mean(self, x: Tensor) -> Tensor:
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x)
            x /= self.world
        return x


def setup_distributed(device: str = "auto") -> DistEnv:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    joined = world > 1 and not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if cuda else "gloo")
    env = DistEnv(dist.get_rank() if world > 1 else 0, world, dev)
    if joined:
        atexit.register(env.close)      # a safety net for callers that never call env.close()
    return env


def _wrap(model: nn.Module, cfg: TrainConfig, env: DistEnv) -> nn.Module:
    if env.world == 1:
        return model
    if cfg.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in getattr(model, "blocks", []):      # shard per block, then the rest (FSDP2)
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """Full (unsharded) CPU state dicts, for any of: a plain module, DDP, FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        return get_model_state_dict(model, options=options)
    return get_state_dict(model, optimizer, options=options)


def _set_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict, opt_state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=opt_state,
                   options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


# ----------------------------------------------------------------------------------------------------------------
# The loop


def _log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint: they will be trained (and logged) again."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in keep)))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of 0-based `step`: linear warm-up, constant, then (decay_steps > 0) linear decay to 0 at
    cfg.steps. Warmup-stable-decay (Hu et al. 2024, MiniCPM §4): the decay is the run's end, so a stable run can
    be extended and cooled down later by rerunning it with more steps and decay_steps."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    if cfg.decay_steps:
        lr *= min(1.0, (cfg.steps - step) / cfg.decay_steps)
    return lr


def _comparable(d: dict) -> dict:
    # Everything but the end of the run (its length and cool-down) and the bookkeeping cadence must match to continue
    # a run. Parsed first, so that a field added since the checkpoint was written compares as its default.
    d = TrainConfig.from_dict(d).to_dict()
    return {k: v for k, v in d.items() if k not in ("steps", "decay_steps", "save_every", "log_every", "keep")}


@torch.enable_grad()          # whatever the caller's grad mode (e.g. after an in-process `sanaflow generate`)
def train(cfg: TrainConfig, run: str | Path, env: DistEnv | None = None, progress: bool = True,
          require_checkpoint: bool = False) -> dict:
    """Train `cfg` in folder `run` up to cfg.steps, resuming from its newest checkpoint. Returns a summary:
    step, last loss, rank, the data info of task.prepare() and "model", the trained module of this process."""
    run = Path(run)
    env = env or setup_distributed()
    if cfg.batch_size % env.world:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {env.world} processes")
    run.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint.latest(run)
    if ckpt is None and require_checkpoint:
        raise FileNotFoundError(f"--resume: {run} has no checkpoint")
    task = task_class(cfg.task)(cfg, run, env)
    data_info = task.prepare()                             # raises DataError before any training work

    torch.manual_seed(cfg.seed)
    model = task.build_model().to(env.device)
    if cfg.grad_checkpointing and hasattr(model, "grad_checkpointing"):
        model.grad_checkpointing = True
    if cfg.ema_decay > 0 and cfg.parallel == "fsdp" and env.world > 1:
        raise ValueError("ema_decay > 0 with parallel='fsdp' is not supported: the EMA copy would be unsharded")
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else None
    if ema is not None:
        ema_params, model_params = list(ema.parameters()), list(model.parameters())
    wrapped = _wrap(model, cfg, env)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    start, log_path = 0, run / "log.jsonl"
    if ckpt is not None:
        weights, ema_weights, opt_state, state = checkpoint.load(ckpt)
        if _comparable(state["config"]) != _comparable(cfg.to_dict()):
            diff = sorted(k for k in set(state["config"]) | set(cfg.to_dict())
                          if _comparable(state["config"]).get(k) != _comparable(cfg.to_dict()).get(k))
            raise ValueError(f"{run}: its checkpoint was trained with a different config (fields {diff}); "
                             f"use another --out folder, or the same config")
        _set_full_state(wrapped, optimizer, weights, opt_state)
        if ema is not None and ema_weights is not None:
            ema.load_state_dict(ema_weights)
        start = state["step"]
    if env.main:
        write_json_atomic(run / "config.json", cfg.to_dict())
        _truncate_log(log_path, start)
        _log(log_path, {"event": "resume" if start else "start", "step": start, "world": env.world,
                        "device": str(env.device), **data_info})

    autocast = torch.autocast(env.device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        cfg.precision, torch.float32), enabled=cfg.precision != "fp32" and env.device.type == "cuda")
    scaler = torch.amp.GradScaler(enabled=cfg.precision == "fp16" and env.device.type == "cuda")
    bar = None
    if progress and env.main and start < cfg.steps:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.task}", dynamic_ncols=True)
    last_saved, t0, seen, loss_value = (start if ckpt else None), time.perf_counter(), 0, float("nan")
    wrapped.train()
    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        batch = task.batch(step, step_generator(cfg.seed, step))
        with autocast:
            loss = task.loss(wrapped, batch)
        loss_value = env.mean(loss.detach().float()).item()
        if not math.isfinite(loss_value):
            raise TrainingError(_stopped(f"the loss is {loss_value} at step {step + 1}", run, last_saved))
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip or float("inf"))
        if not torch.isfinite(grad_norm) and not scaler.is_enabled():
            raise TrainingError(_stopped(f"the gradient norm is {grad_norm.item()} at step {step + 1}", run, last_saved))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():                       # one fused update of all EMA tensors, not a Python loop
                torch._foreach_lerp_(ema_params, model_params, 1 - cfg.ema_decay)
        seen += cfg.batch_size
        done = step + 1
        if env.main and (done % cfg.log_every == 0 or done == cfg.steps):
            rate = seen / (time.perf_counter() - t0)
            _log(log_path, {"step": done, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                            "grad_norm": grad_norm.item(), "samples_per_s": rate})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{seen / (time.perf_counter() - t0):.1f}")
        if done % cfg.save_every == 0 or done == cfg.steps:
            _save(run, done, wrapped, optimizer, ema, cfg, env, task)
            last_saved = done
    if bar is not None:
        bar.close()
    final = model if ema is None else ema
    if cfg.parallel == "fsdp" and env.world > 1:           # sharded parameters: gather a full copy to export
        weights = _full_state(wrapped)                      # collective; the full copy lands on rank 0 only
        if env.main:
            final = task.build_model().to(env.device)
            final.load_state_dict(weights)
    if env.main:
        # The exported model is the newest checkpoint's weights (EMA if on), in the task's loadable format.
        task.export(final, run / "model")
    env.barrier()
    # "model": this process's trained module (each rank holds a full copy under DDP).
    return {"step": cfg.steps, "loss": loss_value, "run": str(run), "rank": env.rank, "model": model, **data_info}


def _stopped(reason: str, run: Path, last_saved: int | None) -> str:
    kept = f"the last good checkpoint (step {last_saved}) is kept in {run / 'checkpoints'}" if last_saved \
        else "no checkpoint had been written yet"
    return f"training stopped: {reason}; nothing was saved after it, {kept}. Lower lr or check the data."


def _save(run: Path, step: int, wrapped: nn.Module, optimizer, ema, cfg: TrainConfig, env: DistEnv, task) -> None:
    weights, opt_state = _full_state(wrapped, optimizer)   # collective under FSDP: every rank takes part
    if env.main:
        position = task.order.position(step) if hasattr(task, "order") else {}
        checkpoint.save(run, step, weights, opt_state,
                        {"config": cfg.to_dict(), "data_position": position, "world": env.world},
                        None if ema is None else ema.state_dict(), cfg.keep)
    env.barrier()
