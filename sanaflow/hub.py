"""Official SANA weights from local paths: diffusers folders and original NVlabs / mit-han-lab files; and our
models written back as diffusers folders, the format users load checkpoints through.

Foreign weights are converted here, at the edge, by explicit key maps (interop §1.3, §6.2, §6.3); the models
never know where their weights came from. Every converter pops the keys it uses and fails on leftovers, every
loader names the file it was reading when something is wrong, and nothing here unpickles code: safetensors, or
`torch.load(weights_only=True)` for `.pth`/`.bin`. Every writer builds its folder beside the target and renames
it into place, so a crash never leaves a half-written folder where a good one was.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .dcae import DCAE, DCAE_PRESETS, DCAEConfig
from .dit import DIT_PRESETS, DiT, DiTConfig
from .keymaps import (dcae_config_from_diffusers, dcae_config_to_diffusers, dcae_from_diffusers, dcae_from_original,
                      dcae_to_diffusers, dit_config_from_diffusers, dit_config_from_original, dit_config_to_diffusers,
                      dit_from_diffusers, dit_from_original, dit_to_diffusers)

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
    if variant is None:
        variant = detect_variant(folder, stem)
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


def detect_variant(folder: Path, stem: str) -> str | None:
    """None if plain `stem` weights exist in `folder`, else the only variant present ("fp16", "bf16", ...)."""
    if any((folder / f"{stem}{ext}").exists()
           for ext in (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")):
        return None
    # <stem>.<v>.safetensors, <stem>.<v>-0000k-of-0000n.safetensors, <stem>.safetensors.index.<v>.json, legacy
    # <stem>.safetensors.<v>.index.json.
    pattern = re.compile(rf"{re.escape(stem)}\.(?:(?:safetensors|bin)\.(?:index\.)?)?(\w+)[.-]")
    found = sorted({m.group(1) for f in folder.iterdir() if (m := pattern.match(f.name))} - {"index"})
    if len(found) > 1:
        raise CheckpointError(f"{folder}: no plain {stem} weights; pick a variant from {found}")
    return found[0] if found else None


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
# Loaders


def _build(cls, cfg):
    with torch.device("meta"):            # no memory and no init for weights that are about to be replaced
        return cls(cfg)


def _load_component(folder: str | Path, model_cls, config_fn, convert_fn, dtype, variant,
                    stem: str = "diffusion_pytorch_model"):
    """config.json -> our config (config_fn), weights <stem>*.safetensors -> our keys (convert_fn), strict load;
    errors name the folder. transformers folders use stem "model"."""
    folder = Path(folder)
    try:
        cfg = config_fn(read_json(folder / "config.json"))
    except ValueError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from e
    sd = read_diffusers_weights(folder, stem=stem, variant=variant)
    try:
        sd = convert_fn(sd, cfg)
    except (KeyError, RuntimeError) as e:   # RuntimeError: q/k/v that cannot be fused (wrong shapes)
        raise CheckpointError(f"{folder}: weights do not match config.json: {e.args[0]}") from e
    return load_into(_build(model_cls, cfg), sd, str(folder), dtype)


def load_dit(folder: str | Path, dtype: torch.dtype = torch.float32, variant: str | None = None) -> DiT:
    """A diffusers `transformer/` folder (config.json + safetensors, sharded or not, any variant) -> our DiT."""
    return _load_component(folder, DiT, dit_config_from_diffusers, dit_from_diffusers, dtype, variant)


def load_dcae(folder: str | Path, dtype: torch.dtype = torch.float32, variant: str | None = None) -> DCAE:
    """A diffusers `vae/` folder of AutoencoderDC -> our DCAE."""
    return _load_component(folder, DCAE, dcae_config_from_diffusers, dcae_from_diffusers, dtype, variant)


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
    cfg = DCAE_PRESETS[config] if isinstance(config, str) else config
    sd = read_state_dict(path)
    try:
        sd = dcae_from_original(sd, cfg)
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: {e.args[0]}") from e
    return load_into(_build(DCAE, cfg), sd, str(path), dtype)


# ----------------------------------------------------------------------------------------------------------------
# Writers


# The diffusers release our folders are checked against (tests load them with it; pyproject's dev pin). diffusers
# reads "_diffusers_version" only to decide on deprecation shims for old folders.
DIFFUSERS_VERSION = "0.42.1"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def write_json(path: Path, obj: dict) -> None:
    """JSON as diffusers writes its configs (sorted keys, indent 2); the folder is created. Not atomic on its own:
    used inside `write_folder_atomic`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _fsync(path: Path | str) -> None:
    if os.name != "posix" and Path(path).is_dir():      # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under root, so that the rename that publishes it cannot overtake the data."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(folder, name))
        _fsync(folder)


def _named(e: OSError, message: str) -> OSError:
    """`message` as an OSError of e's kind (PermissionError, ...) when e has an errno."""
    return OSError(e.errno, message) if e.errno else OSError(message)


def write_folder_atomic(folder: str | Path, write: Callable[[Path], None]) -> Path:
    """Replace `folder` by what write(tmp) puts into a fresh temporary sibling folder; returns `folder`.

    Whatever write does, `folder` is either left as it was or replaced by a complete new folder: write fills
    `.{name}.tmp-*` beside it (same file system, so renames are atomic), and only a complete, flushed folder is
    renamed into place. On an exception the temporary folder is removed and the exception propagates; OSErrors
    are re-raised naming `folder`. POSIX cannot rename onto a non-empty folder, so an existing one is first
    renamed to `.{name}.old-*` and deleted after the swap: between the two renames `folder` is briefly absent,
    never partial (a crash just then leaves the old folder complete under that name).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder}: exists and is not a folder; not replacing it")
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()             # not tempfile.mkdtemp: its mode 0o700 would stay on the published folder
            write(tmp)
            _fsync_tree(tmp)
        except OSError as e:
            raise _named(e, f"{folder}: could not write the new folder ({type(e).__name__}: {e}); the existing "
                            f"one, if any, is unchanged") from e
        _publish(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the complete folder `tmp` to `folder`, moving an existing `folder` aside first and back on failure."""
    old = None
    try:
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(folder, old)
        os.replace(tmp, folder)
    except BaseException as e:
        if old is not None and old.exists():
            try:
                os.replace(old, folder)                                 # put the previous folder back
            except OSError as e2:
                raise _named(e2, f"{folder}: could not rename the new folder into place ({e}), nor put the "
                                 f"previous one back ({e2}); the previous one is complete at {old}") from e
        if isinstance(e, OSError):
            raise _named(e, f"{folder}: could not rename the new folder into place ({type(e).__name__}: {e}); "
                            f"the existing one, if any, is unchanged") from e
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync(folder.parent)                                               # make the rename itself durable


def _save_component(model: nn.Module, folder: str | Path, cls: type, class_name: str, config_fn, convert_fn,
                    dtype: torch.dtype | None) -> Path:
    """Our model -> a diffusers component folder: config.json (+ _class_name, _diffusers_version) and one
    safetensors file, written atomically. Everything that can be wrong is checked before anything is written."""
    folder = Path(folder)
    if not isinstance(model, cls):
        raise TypeError(f"{folder}: expected a sanaflow {cls.__name__}, got {type(model).__name__} "
                        f"(unwrap DDP / torch.compile first: model.module, model._orig_mod)")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"{folder}: dtype={dtype!r} must be a floating-point torch.dtype, or None for the model's")
    try:
        config = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **config_fn(model.cfg)}
        sd = convert_fn(model.state_dict(), model.cfg)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{folder}: cannot write the {class_name} folder: {e.args[0] if e.args else e}") from e
    # safetensors stores CPU, contiguous tensors; the model's own dtype unless asked otherwise.
    tensors = {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype)
               .contiguous() for k, v in sd.items()}

    def write(tmp: Path) -> None:
        write_json(tmp / "config.json", config)
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})   # diffusers' header metadata

    return write_folder_atomic(folder, write)


def save_dit(model: DiT, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Our DiT -> a diffusers `transformer/` folder of SanaTransformer2DModel (config.json +
    diffusion_pytorch_model.safetensors), in the model's dtype or `dtype`. Atomic; `load_dit` reads it back."""
    return _save_component(model, folder, DiT, "SanaTransformer2DModel", dit_config_to_diffusers, dit_to_diffusers,
                           dtype)


def save_dcae(model: DCAE, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Our DCAE -> a diffusers `vae/` folder of AutoencoderDC, scaling_factor included. Atomic; `load_dcae`
    reads it back."""
    return _save_component(model, folder, DCAE, "AutoencoderDC", dcae_config_to_diffusers, dcae_to_diffusers, dtype)
