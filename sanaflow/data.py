"""Image-caption storage: WebDataset tar shards and plain folders, plus a reader for users' image folders.

Every sample is an RGB image and a JSON-serialisable dict (`meta`). The storage layer never looks inside
`meta`; `read_image_folder` is the one place that builds it, as {"captions": [{"text", "score"}, ...]}.

On-disk layouts
  write_wds:    out_dir/{prefix}-000000.tar, ... ; members {key}.png, {key}.json in key order, the
                WebDataset convention (a sample is the consecutive members sharing the name up to the first dot).
  write_folder: out_dir/{key}.png and out_dir/{key}.json side by side.
Keys are the sample's index, zero-padded to 9 digits, so string order is write order.

Readers never raise on bad data: each bad sample or shard is skipped, logged with its file and reason, and
counted in the reader's `skipped` Counter (reset at the start of each pass).
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from .files import write_bytes_atomic

log = logging.getLogger(__name__)

ImageLike = np.ndarray | Image.Image
PathLike = str | os.PathLike

KEY_DIGITS = 9                         # 1e9 samples before string order stops matching write order
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PNG_COMPRESS_LEVEL = 6                 # fixed so shards are byte-identical across runs (for one zlib)
TAR_BLOCK = 512


@dataclass(frozen=True, eq=False)      # eq=False: comparing ndarray fields with == is ambiguous
class Sample:
    key: str
    image: np.ndarray                  # (H, W, 3) uint8 RGB
    meta: dict


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


# ---------------------------------------------------------------------------------------------- encoding

def cover_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8: scale so the image covers the target, then centre-crop. The one
    resize of training data (the AE's pixels and the DiT's latents see the same images).

    PIL's bicubic filter widens its kernel when shrinking, so large photos are low-passed rather than aliased
    (a plain bilinear interpolate, as in pipeline.resize_and_crop, samples without filtering)."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    scale = max(height / h, width / w)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    top, left = (rh - height) // 2, (rw - width) // 2
    im = Image.fromarray(image).resize((rw, rh), Image.Resampling.BICUBIC)
    return np.asarray(im.crop((left, top, left + width, top + height)))



def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparent pixels become white rather than whatever colour they hide."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    return im.convert("RGB")


def encode_png(image: ImageLike, where: str = "image") -> bytes:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{where}: ndarray must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        im = Image.fromarray(image, "RGB")
    elif isinstance(image, Image.Image):
        im = to_rgb(image)
    else:
        raise TypeError(f"{where}: expected np.ndarray or PIL.Image, got {type(image).__name__}")
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)   # no pnginfo: no timestamps
    return buf.getvalue()


def encode_json(meta: Any, where: str = "meta") -> bytes:
    if not isinstance(meta, dict):
        raise TypeError(f"{where}: expected a dict, got {type(meta).__name__}")
    try:
        # allow_nan=False: NaN/Infinity are not JSON, and non-Python readers of the shards reject them.
        return json.dumps(meta, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: not JSON-serialisable: {e}") from e


def decode_image(data: bytes) -> np.ndarray:
    """Bytes -> (H, W, 3) uint8 RGB; raises on any corrupt input."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()                                  # decode now so truncated files fail here
        im = ImageOps.exif_transpose(im)           # camera JPEGs store rotation in EXIF
        return np.asarray(to_rgb(im), dtype=np.uint8).copy()


def _samples(samples: Iterable[tuple[ImageLike, dict]], progress: bool, desc: str,
             total: int | None = None) -> Iterator[tuple[str, bytes, bytes]]:
    # total=None lets tqdm take len(samples) when there is one; a generator then shows a count without a total.
    for i, item in enumerate(tqdm(samples, desc=desc, unit="img", disable=not progress, total=total)):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"samples[{i}]: expected an (image, meta) pair, got {type(item).__name__}")
        image, meta = item
        yield sample_key(i), encode_png(image, f"samples[{i}] image"), encode_json(meta, f"samples[{i}] meta")


# ----------------------------------------------------------------------------------------------- writers

def _tar_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0     # fixed metadata: byte-identical reruns
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def _shard_path(out_dir: Path, prefix: str, index: int) -> Path:
    return out_dir / f"{prefix}-{index:06d}.tar"


def _remove_stale_shards(out_dir: Path, prefix: str, n_written: int) -> None:
    # A rerun that writes fewer shards would otherwise leave old ones that read_wds(out_dir) picks up.
    pattern = re.compile(rf"{re.escape(prefix)}-(\d{{6}})\.tar")
    for path in out_dir.iterdir():
        m = pattern.fullmatch(path.name)
        if m and int(m.group(1)) >= n_written:
            log.warning("write_wds: removing stale shard %s from an earlier run", path)
            path.unlink()


def write_wds(samples: Iterable[tuple[ImageLike, dict]], out_dir: PathLike, shard_size: int = 1000,
              prefix: str = "shapes", progress: bool = False, total: int | None = None) -> list[Path]:
    """Write (image, meta) pairs to tar shards {prefix}-NNNNNN.tar; returns the shard paths in order.

    `total`: the number of samples, for the progress bar only (an iterator has no len()); it changes nothing else.

    Each shard is written to `*.tar.tmp` and renamed when complete, so a crash leaves only whole shards
    under final names. If `samples` raises, the shards completed before it stay and the error propagates.
    """
    if not isinstance(shard_size, int) or shard_size <= 0:
        raise ValueError(f"shard_size={shard_size!r}: must be a positive int")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise ValueError(f"prefix={prefix!r}: must be a non-empty file-name prefix without path separators")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    tf, tmp, n_in_shard = None, None, 0
    try:
        for key, png, js in _samples(samples, progress, f"write_wds {out_dir}", total):
            if tf is None:
                path = _shard_path(out_dir, prefix, len(written))
                tmp = path.with_name(path.name + ".tmp")
                # stays open across loop iterations; closed by _finish_shard or the except below
                tf, n_in_shard = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT), 0  # noqa: SIM115
            _tar_member(tf, f"{key}.png", png)
            _tar_member(tf, f"{key}.json", js)
            n_in_shard += 1
            if n_in_shard == shard_size:
                written.append(_finish_shard(tf, tmp, _shard_path(out_dir, prefix, len(written))))
                tf = None
        if tf is not None:
            written.append(_finish_shard(tf, tmp, _shard_path(out_dir, prefix, len(written))))
            tf = None
    except BaseException:          # includes KeyboardInterrupt; re-raised after removing the partial shard
        if tf is not None:
            tf.close()
            tmp.unlink(missing_ok=True)
        raise
    _remove_stale_shards(out_dir, prefix, len(written))
    return written


def _finish_shard(tf: tarfile.TarFile, tmp: Path, path: Path) -> Path:
    tf.close()
    os.replace(tmp, path)          # readers see a whole shard or none
    return path


def write_folder(samples: Iterable[tuple[ImageLike, dict]], out_dir: PathLike, progress: bool = False,
                 total: int | None = None) -> int:
    """Write (image, meta) pairs as out_dir/{key}.png + {key}.json; returns the number written.

    The JSON is written after the PNG, so a crash between the two leaves an image without a partner,
    which read_folder skips and counts. `total`: as in `write_wds`, for the progress bar only.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for key, png, js in _samples(samples, progress, f"write_folder {out_dir}", total):
        write_bytes_atomic(out_dir / f"{key}.png", png)
        write_bytes_atomic(out_dir / f"{key}.json", js)
        n += 1
    return n


# ----------------------------------------------------------------------------------------------- readers

class _Reader:
    """Base: iterate to get Samples; `skipped` counts bad items by reason for the latest pass."""

    def __init__(self) -> None:
        self.skipped: Counter = Counter()

    def _skip(self, reason: str, where: str, detail: object = "") -> None:
        self.skipped[reason] += 1
        log.warning("%s: skipping %s: %s %s", type(self).__name__, where, reason, detail)

    def _decode_pair(self, where: str, key: str, image_bytes: bytes | None, json_bytes: bytes | None) -> Sample | None:
        if image_bytes is None:
            return self._skip("missing_image", where)
        if json_bytes is None:
            return self._skip("missing_json", where)
        try:
            meta = json.loads(json_bytes.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            return self._skip("bad_json", where, e)
        if not isinstance(meta, dict):
            return self._skip("bad_json", where, f"top level is {type(meta).__name__}, not an object")
        image = self._decode(where, image_bytes)
        return None if image is None else Sample(key, image, meta)

    def _decode(self, where: str, data: bytes) -> np.ndarray | None:
        try:
            return decode_image(data)
        # PIL raises many types on corrupt input (OSError, SyntaxError, ValueError, struct.error, EOFError,
        # DecompressionBombError, ...), so everything is caught here, where the input is the only unknown.
        except Exception as e:  # noqa: BLE001
            return self._skip("bad_image", where, f"{type(e).__name__}: {e}")


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key is the path up to the first dot of the base name; ext is the rest."""
    dirname, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{dirname}/{stem}" if dirname else stem), ext.lower()


def _pick_image(group: dict[str, bytes]) -> bytes | None:
    return next((group[e] for e in IMAGE_EXTS if e in group), None)


class WdsReader(_Reader):
    """Samples from WebDataset tar shards (a .png/.jpg/.webp member plus a .json member per key)."""

    def __init__(self, paths_or_dir: PathLike | Iterable[PathLike]):
        super().__init__()
        if isinstance(paths_or_dir, (str, os.PathLike)) and Path(paths_or_dir).is_dir():
            self.paths = sorted(Path(paths_or_dir).glob("*.tar"))
            if not self.paths:
                raise FileNotFoundError(f"read_wds: no *.tar shards in paths_or_dir={str(paths_or_dir)!r}")
        elif isinstance(paths_or_dir, (str, os.PathLike)):
            self.paths = [Path(paths_or_dir)]
        else:
            self.paths = [Path(p) for p in paths_or_dir]

    def __iter__(self) -> Iterator[Sample]:
        self.skipped = Counter()
        for path in self.paths:
            yield from self._read_shard(path)

    def _read_shard(self, path: Path) -> Iterator[Sample]:
        group_key, group = None, {}
        try:
            size = path.stat().st_size
            with tarfile.open(path, "r:") as tf:
                for member in tf:
                    if not member.isfile():
                        continue                       # directories etc. carry no sample data
                    if member.offset_data + member.size > size:
                        self._skip("truncated_tar", f"{path}:{member.name}", "member data past end of file")
                        break
                    key, ext = _split_name(member.name)
                    if key != group_key:
                        yield from self._emit(path, group_key, group)
                        group_key, group = key, {}
                    group[ext] = tf.extractfile(member).read()
                else:
                    self._check_end(path, tf.offset, size)
        except (tarfile.TarError, EOFError) as e:
            self._skip("bad_tar", str(path), e)
        except OSError as e:
            self._skip("unreadable", str(path), e)
        yield from self._emit(path, group_key, group)   # the members read before any error are whole

    def _emit(self, path: Path, key: str | None, group: dict[str, bytes]) -> Iterator[Sample]:
        if key is None:
            return
        sample = self._decode_pair(f"{path}:{key}", key, _pick_image(group), group.get("json"))
        if sample is not None:
            yield sample

    def _check_end(self, path: Path, offset: int, size: int) -> None:
        # tarfile ends iteration silently at a cut or garbled header; a whole archive ends in two zero blocks.
        with open(path, "rb") as f:
            f.seek(offset)
            tail = f.read(2 * TAR_BLOCK)
        if len(tail) < 2 * TAR_BLOCK:
            self._skip("truncated_tar", str(path), f"no end-of-archive marker at byte {offset}")
        elif tail.count(0) != len(tail):
            self._skip("bad_tar", str(path), f"unreadable tar header at byte {offset}")


class FolderReader(_Reader):
    """Samples from write_folder's layout: {key}.png + {key}.json, in key order."""

    def __init__(self, directory: PathLike):
        super().__init__()
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"read_folder: directory={str(directory)!r} is not a directory")

    def __iter__(self) -> Iterator[Sample]:
        self.skipped = Counter()
        groups: dict[str, dict[str, Path]] = {}
        for path in self.directory.iterdir():
            key, ext = _split_name(path.name)
            if ext in ("png", "json") and path.is_file():     # ignores *.tmp left by a crashed writer
                groups.setdefault(key, {})[ext] = path
        for key in sorted(groups):
            where = str(self.directory / key)
            files = groups[key]
            try:
                image_bytes = files["png"].read_bytes() if "png" in files else None
                json_bytes = files["json"].read_bytes() if "json" in files else None
            except OSError as e:
                self._skip("unreadable", where, e)
                continue
            sample = self._decode_pair(where, key, image_bytes, json_bytes)
            if sample is not None:
                yield sample


# ------------------------------------------------------------------------------------ users' image folders

class CaptionError(ValueError):
    """A caption file exists but holds no usable caption."""


def _caption(text: Any, score: Any = None) -> dict:
    if not isinstance(text, str):
        raise CaptionError(f"caption text must be a string, got {type(text).__name__}")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        raise CaptionError(f"caption score must be a number or null, got {score!r}")
    return {"text": text.strip(), "score": score}


def captions_from_json(obj: Any) -> list[dict]:
    """The first of "captions", "caption", "prompt" that is present; str, list of str, list of
    {"text", "score"} or {name: text} (several captioners, as in SANA's multi-caption JSON)."""
    if not isinstance(obj, dict):
        raise CaptionError(f"top level is {type(obj).__name__}, not an object")
    field = next((f for f in ("captions", "caption", "prompt") if f in obj), None)
    if field is None:
        raise CaptionError('no "captions", "caption" or "prompt" field')
    value = obj[field]
    if isinstance(value, str):
        return [_caption(value)]
    if isinstance(value, dict):
        return [_caption(text) for text in value.values()]
    if isinstance(value, list):
        return [_caption(c.get("text"), c.get("score")) if isinstance(c, dict) else _caption(c) for c in value]
    raise CaptionError(f'"{field}" is {type(value).__name__}, expected a string, list or object')


def captions_from_txt(text: str, txt_mode: str) -> list[dict]:
    parts = text.splitlines() if txt_mode == "lines" else [text]
    return [_caption(p) for p in parts]


class ImageFolderReader(_Reader):
    """A user's folder (searched recursively) of name.{jpg,jpeg,png,webp} with name.json or name.txt captions.

    name.json wins when both exist. txt_mode="lines" reads one caption per line, "whole" the file as one
    caption. meta is {"captions": [{"text": str, "score": number | None}, ...]}; key is the image's path
    relative to `directory`, so two images differing only in extension stay distinct.
    """

    def __init__(self, directory: PathLike, txt_mode: str = "lines"):
        super().__init__()
        if txt_mode not in ("lines", "whole"):
            raise ValueError(f"txt_mode={txt_mode!r}: must be 'lines' or 'whole'")
        self.directory, self.txt_mode = Path(directory), txt_mode
        if not self.directory.is_dir():
            raise FileNotFoundError(f"read_image_folder: directory={str(directory)!r} is not a directory")

    def _image_paths(self) -> Iterator[Path]:
        for root, dirs, files in os.walk(self.directory):
            dirs.sort()                                # os.walk order is the file system's; sort for determinism
            for name in sorted(files):
                if name.rpartition(".")[2].lower() in IMAGE_EXTS:
                    yield Path(root) / name

    def __iter__(self) -> Iterator[Sample]:
        self.skipped = Counter()
        for path in self._image_paths():
            sample = self._read_one(path)
            if sample is not None:
                yield sample

    def _read_one(self, path: Path) -> Sample | None:
        where = str(path)
        json_path, txt_path = path.with_suffix(".json"), path.with_suffix(".txt")
        try:
            if json_path.is_file():
                caption_path, captions = json_path, captions_from_json(json.loads(json_path.read_text("utf-8-sig")))
            elif txt_path.is_file():
                caption_path, captions = txt_path, captions_from_txt(txt_path.read_text("utf-8-sig"), self.txt_mode)
            else:
                return self._skip("missing_caption", where)
            image_bytes = path.read_bytes()
        except CaptionError as e:
            return self._skip("bad_caption", str(json_path), e)
        except json.JSONDecodeError as e:
            return self._skip("bad_json", str(json_path), e)
        except UnicodeDecodeError as e:
            return self._skip("bad_caption", where, f"caption file is not UTF-8: {e}")
        except OSError as e:
            return self._skip("unreadable", where, e)
        captions = [c for c in captions if c["text"]]
        if not captions:
            return self._skip("empty_caption", str(caption_path))
        image = self._decode(where, image_bytes)
        if image is None:
            return None
        return Sample(path.relative_to(self.directory).as_posix(), image, {"captions": captions})


def read_wds(paths_or_dir: PathLike | Iterable[PathLike]) -> WdsReader:
    """Shards from a directory (all *.tar, sorted), one shard path, or a list of paths (in that order)."""
    return WdsReader(paths_or_dir)


def read_folder(directory: PathLike) -> FolderReader:
    return FolderReader(directory)


def read_image_folder(directory: PathLike, txt_mode: str = "lines") -> ImageFolderReader:
    return ImageFolderReader(directory, txt_mode)
