import io
import json
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from sanaflow.data import (
    FolderReader,
    WdsReader,
    read_folder,
    read_image_folder,
    read_wds,
    write_folder,
    write_wds,
)

SIZES = [(8, 8), (5, 13), (16, 7), (1, 1), (32, 24)]


def make_samples(n: int, seed: int = 0) -> list[tuple[np.ndarray, dict]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        meta = {"captions": [{"text": f"sample {i} ünïcode", "score": float(rng.random())}, {"text": "x", "score": None}],
                "scene": {"background": "white", "objects": [{"shape": "circle", "x": i / 7, "tags": [1, [2, {"a": None}]]}]},
                "index": i}
        out.append((rng.integers(0, 256, (h, w, 3), dtype=np.uint8), meta))
    return out


def assert_same(samples, expected):
    assert len(samples) == len(expected)
    for s, (image, meta) in zip(samples, expected):
        assert s.image.dtype == np.uint8 and s.image.shape == image.shape
        np.testing.assert_array_equal(s.image, image)
        assert s.meta == meta


def tar_infos(path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return tf.getmembers()


def shard_bytes(paths):
    return [p.read_bytes() for p in paths]


# ------------------------------------------------------------------------------------------ round trips

def test_wds_round_trip_shards_and_determinism(tmp_path):
    data = make_samples(23)
    paths = write_wds(iter(data), tmp_path / "a", shard_size=10)
    assert [p.name for p in paths] == ["shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar"]
    counts = [len(tar_infos(p)) // 2 for p in paths]
    assert counts == [10, 10, 3]
    names = [m.name for m in tar_infos(paths[1])]
    assert names[:2] == ["000000010.png", "000000010.json"]
    reader = read_wds(tmp_path / "a")
    got = list(reader)
    assert [s.key for s in got] == sorted(s.key for s in got) and len({s.key for s in got}) == 23
    assert_same(got, data)
    assert reader.skipped == {}
    # same input -> byte-identical shards, and the file list order is honoured
    paths_b = write_wds(data, tmp_path / "b", shard_size=10)
    assert shard_bytes(paths) == shard_bytes(paths_b)
    # two runs within one second would match even with real mtimes, so check the fixed header fields too
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in tar_infos(paths[0])} == {(0, 0, 0, "", 0o644)}
    assert_same(list(read_wds([str(p) for p in paths_b])), data)
    assert not list((tmp_path / "a").glob("*.tmp"))


def test_wds_accepts_pil_and_exact_multiple(tmp_path):
    data = make_samples(4)
    pil = [(Image.fromarray(im), meta) for im, meta in data]
    paths = write_wds(pil, tmp_path, shard_size=2, prefix="p")
    assert [p.name for p in paths] == ["p-000000.tar", "p-000001.tar"]   # no empty third shard
    assert_same(list(read_wds(tmp_path)), data)


def test_rerun_with_fewer_shards_removes_stale_ones(tmp_path):
    write_wds(make_samples(5), tmp_path, shard_size=1)
    write_wds(make_samples(2, seed=1), tmp_path, shard_size=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes-000000.tar", "shapes-000001.tar"]
    assert_same(list(read_wds(tmp_path)), make_samples(2, seed=1))


def test_folder_round_trip(tmp_path):
    data = make_samples(7)
    assert write_folder(data, tmp_path, progress=True) == 7
    assert sorted(p.name for p in tmp_path.iterdir())[:2] == ["000000000.json", "000000000.png"]
    reader = read_folder(tmp_path)
    assert_same(list(reader), data)
    assert reader.skipped == {}
    assert not list(tmp_path.glob("*.tmp"))


def test_writers_reject_bad_input(tmp_path):
    with pytest.raises(ValueError, match="shard_size"):
        write_wds([], tmp_path, shard_size=0)
    with pytest.raises(ValueError, match=r"samples\[0\] image"):
        write_wds([(np.zeros((4, 4), np.uint8), {})], tmp_path)
    with pytest.raises(TypeError, match=r"samples\[0\] meta"):
        write_folder([(np.zeros((4, 4, 3), np.uint8), [1, 2])], tmp_path)
    with pytest.raises(ValueError, match=r"samples\[0\] meta"):
        write_folder([(np.zeros((4, 4, 3), np.uint8), {"s": float("nan")})], tmp_path)


def test_webdataset_library_reads_our_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    data = make_samples(9)
    paths = write_wds(data, tmp_path, shard_size=4)
    ds = wds.WebDataset([str(p) for p in paths], shardshuffle=False).decode("rgb8")
    got = list(ds)
    assert [s["__key__"] for s in got] == [f"{i:09d}" for i in range(9)]
    for s, (image, meta) in zip(got, data):
        np.testing.assert_array_equal(s["png"], image)
        assert s["json"] == meta


# ---------------------------------------------------------------------------------------- atomic writes

def failing(data, fail_at):
    for i, item in enumerate(data):
        if i == fail_at:
            raise RuntimeError("renderer crashed")
        yield item


def test_wds_iterator_error_keeps_finished_shards(tmp_path):
    data = make_samples(10)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        write_wds(failing(data, 7), tmp_path, shard_size=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes-000000.tar", "shapes-000001.tar"]
    reader = read_wds(tmp_path)
    assert_same(list(reader), data[:6])
    assert reader.skipped == {}


def test_folder_iterator_error_leaves_no_tmp(tmp_path):
    data = make_samples(5)
    with pytest.raises(RuntimeError):
        write_folder(failing(data, 3), tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    assert_same(list(read_folder(tmp_path)), data[:3])


# ------------------------------------------------------------------------------------------ bad data

def tar_with(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def members_of(path):
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf]


def test_wds_bad_members_are_skipped_and_counted(tmp_path, caplog):
    data = make_samples(6)
    (good,) = write_wds(data, tmp_path / "src", shard_size=6)
    m = members_of(good)                       # [k0.png, k0.json, k1.png, k1.json, ...]
    png1 = m[2][1]
    bad = [m[0], m[1],
           (m[2][0], png1[: len(png1) // 2]), m[3],          # truncated PNG
           m[4], (m[5][0], b'{"captions": [1,'),             # malformed JSON
           m[6],                                             # image without its JSON
           m[9],                                             # JSON without its image
           ("000000009.png", b"garbage bytes, not an image"), ("000000009.json", b"[1, 2]"),  # list, not dict
           ("000000010.png", b"garbage bytes, not an image"), ("000000010.json", b"{}"),
           m[10], m[11]]
    shard = tmp_path / "bad.tar"
    shard.write_bytes(tar_with(bad))
    reader = read_wds(shard)
    with caplog.at_level(logging.WARNING, logger="sanaflow.data"):
        got = list(reader)
    assert [s.key for s in got] == ["000000000", "000000005"]
    assert_same(got, [data[0], data[5]])
    assert reader.skipped == {"bad_image": 2, "bad_json": 2, "missing_json": 1, "missing_image": 1}
    assert any("000000001" in r.getMessage() and "bad_image" in r.getMessage() for r in caplog.records)
    # a second pass counts afresh rather than accumulating
    list(reader)
    assert reader.skipped["bad_image"] == 2


@pytest.mark.parametrize("cut", ["mid_member", "mid_header", "no_end_marker"])
def test_wds_truncated_last_shard(tmp_path, cut):
    data = make_samples(6)
    paths = write_wds(data, tmp_path, shard_size=3)
    raw = paths[1].read_bytes()
    offsets = [(m.offset, m.offset_data, m.size) for m in tar_infos(paths[1])]
    last_header, last_data, last_size = offsets[-2]           # the PNG of the last sample
    end = {"mid_member": last_data + last_size // 2, "mid_header": last_header + 100,
           "no_end_marker": offsets[-1][1] + 512}[cut]          # after the last member, before the zero blocks
    paths[1].write_bytes(raw[:end])
    reader = read_wds(tmp_path)
    got = list(reader)
    n_whole = 6 if cut == "no_end_marker" else 5               # a cut inside sample 5 loses only sample 5
    assert_same(got, data[:n_whole])
    assert reader.skipped == {"truncated_tar": 1}


def test_wds_garbage_and_unreadable_shards(tmp_path):
    data = make_samples(2)
    (good,) = write_wds(data, tmp_path / "ok")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x01" * 3000)
    a_dir = tmp_path / "dir.tar"
    a_dir.mkdir()
    reader = read_wds([junk, tmp_path / "missing.tar", a_dir, good])
    assert_same(list(reader), data)
    assert reader.skipped == {"bad_tar": 1, "unreadable": 2}


def test_folder_bad_files(tmp_path):
    data = make_samples(4)
    write_folder(data, tmp_path)
    (tmp_path / "000000001.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "000000002.json").write_text("{not json")
    (tmp_path / "000000003.json").unlink()
    (tmp_path / "000000009.json").write_text("{}")
    (tmp_path / "000000000.png.tmp").write_bytes(b"left by a crash")
    (tmp_path / "000000005.json").mkdir()                     # not a file: ignored like any non-sample entry
    reader = read_folder(tmp_path)
    assert_same(list(reader), data[:1])
    assert reader.skipped == {"bad_image": 1, "bad_json": 1, "missing_json": 1, "missing_image": 1}


def test_readers_reject_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory"):
        read_folder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no \\*.tar"):
        read_wds(tmp_path)
    assert isinstance(read_wds([]), WdsReader) and isinstance(read_folder(tmp_path), FolderReader)


# ------------------------------------------------------------------------------- users' image folders

def save(im: Image.Image, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)


def test_read_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (5, 4), dtype=np.uint8)
    rgba = rng.integers(0, 256, (4, 4, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0                                          # row 0 fully transparent
    rgba[1:, :, 3] = 255                                       # the rest opaque
    save(Image.fromarray(rgb), tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red circle\n\n  two blue squares  \n")
    save(Image.fromarray(gray), tmp_path / "b.png")
    (tmp_path / "b.json").write_text(json.dumps({"captions": [{"text": "gray", "score": 0.25}, "plain"]}))
    save(Image.fromarray(rgba, "RGBA"), tmp_path / "sub" / "c.webp", lossless=True)
    (tmp_path / "sub" / "c.json").write_text(json.dumps({"prompt": "transparent top"}))
    save(Image.fromarray(rgb), tmp_path / "d.jpg", quality=95)
    (tmp_path / "d.json").write_text(json.dumps({"caption": "a jpeg", "other": 1}))
    save(Image.fromarray(rgb), tmp_path / "no_caption.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "corrupt.txt").write_text("caption for a corrupt image")
    save(Image.fromarray(rgb), tmp_path / "empty.png")
    (tmp_path / "empty.txt").write_text("\n \n")
    save(Image.fromarray(rgb), tmp_path / "badjson.png")
    (tmp_path / "badjson.json").write_text('{"caption": ')
    save(Image.fromarray(rgb), tmp_path / "nofield.png")
    (tmp_path / "nofield.json").write_text('{"title": "x"}')
    (tmp_path / "notes.md").write_text("not an image")

    reader = read_image_folder(tmp_path)
    got = {s.key: s for s in reader}
    assert list(got) == ["a.png", "b.png", "d.jpg", "sub/c.webp"]
    assert reader.skipped == {"missing_caption": 1, "bad_image": 1, "empty_caption": 1, "bad_json": 1,
                              "bad_caption": 1}
    np.testing.assert_array_equal(got["a.png"].image, rgb)
    assert got["a.png"].meta == {"captions": [{"text": "a red circle", "score": None},
                                              {"text": "two blue squares", "score": None}]}
    np.testing.assert_array_equal(got["b.png"].image, np.repeat(gray[..., None], 3, axis=2))
    assert got["b.png"].meta["captions"] == [{"text": "gray", "score": 0.25}, {"text": "plain", "score": None}]
    c = got["sub/c.webp"].image
    assert c.shape == (4, 4, 3) and c.dtype == np.uint8
    assert (c[0] == 255).all()                                 # transparent -> white background
    np.testing.assert_array_equal(c[1:], rgba[1:, :, :3])
    assert got["sub/c.webp"].meta == {"captions": [{"text": "transparent top", "score": None}]}
    d = got["d.jpg"].image
    with Image.open(tmp_path / "d.jpg") as im:                 # JPEG is lossy: compare with a plain decode
        np.testing.assert_array_equal(d, np.asarray(im.convert("RGB")))
    assert got["d.jpg"].meta == {"captions": [{"text": "a jpeg", "score": None}]}

    whole = {s.key: s.meta for s in read_image_folder(tmp_path, txt_mode="whole")}
    assert whole["a.png"] == {"captions": [{"text": "a red circle\n\n  two blue squares", "score": None}]}
    with pytest.raises(ValueError, match="txt_mode"):
        read_image_folder(tmp_path, txt_mode="paragraphs")
