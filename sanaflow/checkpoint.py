"""Training checkpoints: safetensors tensors + one JSON file, written so that a crash never loses the last good one.

Layout under a run folder:

    checkpoints/step-000200/model.safetensors       weights (fp32 master copy)
                           ema.safetensors         EMA weights (only when EMA is on)
                           optimizer.safetensors   optimizer tensors, keyed "<param index>.<name>"
                           state.json              step, config, optimizer param groups, data position, ...
    checkpoints/latest                             the name of the newest complete checkpoint

A checkpoint is written into `step-N.tmp`, flushed to disk, renamed to `step-N`, and only then named in
`latest` (itself replaced atomically). A process killed at any point leaves `latest` naming a complete
checkpoint. Nothing here unpickles: tensors are safetensors, everything else is JSON.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .files import write_json_atomic

FILES = ("model.safetensors", "optimizer.safetensors", "state.json")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names the file."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, write) -> None:
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def optimizer_to_safetensors(sd: dict) -> tuple[dict[str, Tensor], dict]:
    """An optimizer state_dict (state keyed by parameter name or index) split into flat tensors keyed
    "<param>/<name>" and a JSON-able rest (param groups, non-tensor state)."""
    tensors, scalars = {}, {}
    for param, state in sd["state"].items():
        for name, value in state.items():
            key = f"{param}/{name}"
            if isinstance(value, Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    int_keys = all(isinstance(k, int) for k in sd["state"])
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars, "int_keys": int_keys}


def optimizer_from_safetensors(tensors: dict[str, Tensor], meta: dict) -> dict:
    state: dict = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        param, name = key.rsplit("/", 1)
        state.setdefault(int(param) if meta["int_keys"] else param, {})[name] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save(run: Path, step: int, weights: dict[str, Tensor], optimizer: dict, state: dict,
         ema: dict[str, Tensor] | None = None, keep: int = 2) -> Path:
    """Write checkpoint `step` of `run` (model and EMA state dicts, an optimizer state_dict, JSON-able `state`)
    atomically, and keep the newest `keep` checkpoints."""
    root = Path(run) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    final, tmp = root / name, root / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)             # leftovers of a run killed while saving
    tmp.mkdir()

    def tensors(sd: dict[str, Tensor]) -> dict[str, Tensor]:
        # safetensors refuses tensors sharing memory (tied weights, e.g. Gemma's embeddings): copy repeats.
        out, seen = {}, set()
        for k, v in sd.items():
            v = v.detach().cpu().contiguous()
            ptr = v.untyped_storage().data_ptr()
            out[k] = v.clone() if ptr in seen else v
            seen.add(ptr)
        return out
    _write(tmp / "model.safetensors", lambda p: save_file(tensors(weights), p))
    if ema is not None:
        _write(tmp / "ema.safetensors", lambda p: save_file(tensors(ema), p))
    opt_tensors, opt_meta = optimizer_to_safetensors(optimizer)
    _write(tmp / "optimizer.safetensors", lambda p: save_file(opt_tensors, p))
    _write(tmp / "state.json", lambda p: p.write_text(json.dumps(dict(state, step=step, optimizer=opt_meta), indent=1)))
    _fsync_dir(tmp)
    if final.exists():                                  # the same step saved again (e.g. a rerun): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    write_json_atomic(root / "latest", name)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run: Path) -> Path | None:
    """The newest complete checkpoint of `run`, or None if it has none."""
    root = Path(run) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        try:
            path = root / json.loads(pointer.read_text())
        except (json.JSONDecodeError, TypeError) as e:
            raise CheckpointError(f"{pointer}: unreadable ({e}); delete it to fall back on the newest complete "
                                  f"checkpoint folder") from e
        if not path.is_dir():
            raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
        return path
    complete = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                      and all((p / f).is_file() for f in FILES))
    return complete[-1] if complete else None


def load(path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, dict, dict]:
    """(model weights, EMA weights or None, optimizer state_dict, state) of one checkpoint folder."""
    path = Path(path)

    def tensors(name: str) -> dict[str, Tensor]:
        try:
            return load_file(path / name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path / name}: cannot read ({e})") from e
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / 'state.json'}: cannot read ({e})") from e
    ema = tensors("ema.safetensors") if (path / "ema.safetensors").is_file() else None
    optimizer = optimizer_from_safetensors(tensors("optimizer.safetensors"), state.pop("optimizer"))
    return tensors("model.safetensors"), ema, optimizer, state
