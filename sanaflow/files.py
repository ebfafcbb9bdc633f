"""Atomic file writes: the one way sanaflow replaces a file (caches, logs, configs, metrics, images, samples).

`write(tmp)` fills a temporary sibling, which is flushed to disk and renamed over the target: a reader, or a
run killed part-way, sees the old file or the new one, never half of one. A failed write removes its temporary.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    text = json.dumps(obj, indent=1)            # serialise first: an unserialisable obj never touches the disk
    return atomic_write(path, lambda p: p.write_text(text))
