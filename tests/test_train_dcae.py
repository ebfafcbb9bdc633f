"""The DC-AE training task (sanaflow/train_dcae.py) through the shared loop: reconstruction, scaling factor, data."""
from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sanaflow import shapes, train_dcae
from sanaflow.data import cover_crop, write_wds
from sanaflow.dcae import DCAE, DCAE_PRESETS
from sanaflow.hub import load_dcae
from sanaflow.train import DataError, DistEnv, TrainConfig, train
from sanaflow.train_dcae import DCAETask, edge_loss, psnr

ONE_THREAD = True                           # tests/conftest.py: tiny models, one torch thread

N, SIZE, N_EVAL = 24, 32, 4                 # 24 shapes images of 32 px; the last 4 are held out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dcae") / "data"
    write_wds(shapes.samples(N, SIZE, seed=1), d, shard_size=10)
    return d


def config(data: Path, options: dict | None = None, **changes) -> TrainConfig:
    options = {"resolution": SIZE, "eval_samples": N_EVAL, "stats_samples": 16, **(options or {})}
    return TrainConfig(**{"task": "dcae", "data": str(data), "model": "tiny", "options": options, "steps": 40,
                          "batch_size": 4, "lr": 2e-3, "grad_clip": 1.0, "save_every": 100, "log_every": 1,
                          "seed": 0, **changes})


def images(indices, seed: int = 1) -> torch.Tensor:
    """Shapes images rendered afresh (not read from the cache), in [-1, 1]: (B, 3, SIZE, SIZE)."""
    arr = np.stack([shapes.sample(i, SIZE, seed)[0] for i in indices])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def mean_psnr(model: DCAE, x: torch.Tensor) -> float:
    return psnr(model(x), x).mean().item()


def test_training_lowers_reconstruction_error_and_exports_unit_variance_latents(data, tmp_path):
    cfg = config(data)
    torch.manual_seed(cfg.seed)                               # the loop builds its model right after this seed
    untrained = DCAE(DCAE_PRESETS["tiny"])
    held_out, stats = images(range(N - N_EVAL, N)), images(range(16))
    before = mean_psnr(untrained, held_out)

    train(cfg, tmp_path, progress=False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert log[0]["samples"] == N - N_EVAL and log[0]["eval_samples"] == N_EVAL and log[0]["skipped"] == {}
    assert np.mean(losses[-5:]) < 0.5 * losses[0], losses        # losses[0]: the untrained model

    vae = load_dcae(tmp_path / "model")
    metrics = json.loads((tmp_path / "ae_metrics.json").read_text())
    after = mean_psnr(vae, held_out)
    # Images the model never trained on: the trained AE must reconstruct them clearly better than its init.
    assert after > before + 3, (before, after)
    # ae_metrics.json's PSNR is on exactly these held-out images (the last eval_samples of the data set).
    assert metrics["eval"] == {"samples": N_EVAL, "psnr_db": pytest.approx(after, abs=1e-3)}
    # Encoding and decoding through the scaled latent space reconstructs as the unscaled forward does.
    with torch.no_grad():
        z = vae.encode(stats)
        assert psnr(vae.decode(z), stats).mean().item() == pytest.approx(mean_psnr(vae, stats), abs=1e-3)
    # scaling_factor = 1 / std of the latents of the stats images, so their scaled latents have std 1 (§2.5).
    assert vae.cfg.scaling_factor == pytest.approx(metrics["scaling_factor"], rel=1e-6)
    assert z.std().item() == pytest.approx(1.0, abs=1e-4)
    assert metrics["latent"]["std"] == pytest.approx(1 / vae.cfg.scaling_factor, rel=1e-5)
    assert len(metrics["latent"]["channel_std"]) == DCAE_PRESETS["tiny"].latent_channels
    with torch.no_grad():
        other = vae.encode(images(range(16, 20)))            # training images the statistics did not see
    assert 0.7 < other.std().item() < 1.4, other.std().item()


def test_cache_is_reused_and_rebuilt_when_the_data_or_resolution_change(data, tmp_path, monkeypatch):
    first = DCAETask(config(data), tmp_path, DistEnv())
    assert first.prepare()["cache"] == "built"
    # The cached pixels are the rendered images, in the reader's order; the held-out ones are the last.
    torch.testing.assert_close(first.images.float() / 127.5 - 1, images(range(N)), rtol=0, atol=1e-6)

    def no_decoding(*args):
        raise AssertionError("decoded the data again")
    with monkeypatch.context() as m:                          # a resumed run reads the cache, decodes nothing
        m.setattr(train_dcae, "cover_crop", no_decoding)
        again = DCAETask(config(data), tmp_path, DistEnv())
        assert again.prepare()["cache"] == "reused"
    assert torch.equal(again.images, first.images)

    half = DCAETask(config(data, options={"resolution": SIZE // 2}), tmp_path, DistEnv())
    assert half.prepare()["cache"] == "built" and half.images.shape == (N, 3, SIZE // 2, SIZE // 2)

    rewritten = tmp_path / "rewritten"
    write_wds(shapes.samples(N, SIZE, seed=2), rewritten, shard_size=10)
    task = DCAETask(config(rewritten), tmp_path, DistEnv())
    assert task.prepare()["cache"] == "built"
    torch.testing.assert_close(task.images.float() / 127.5 - 1, images(range(N), seed=2), rtol=0, atol=1e-6)


def two_ranks(task: DCAETask, step: int, key: str, seed: int = 0) -> torch.Tensor:
    """batch(step)[key] of the 2 ranks of a 2-process run, concatenated (the task's own env is put back)."""
    env, parts = task.env, []
    for rank in range(2):                 # after prepare: its barrier would need a process group
        task.env = DistEnv(rank=rank, world=2)
        parts.append(task.batch(step, torch.Generator().manual_seed(seed))[key])
    task.env = env
    return torch.cat(parts)


def drawn(data: Path, tmp_path: Path, options: dict, key: str, step: int, seed: int):
    """A task with `options` and its batch(step). Checks that batch[key] comes from the step's generator alone
    (resumable), that each rank gets its slice of the same global draw, and that without the options there is no
    batch[key]."""
    task = DCAETask(config(data, options), tmp_path / "a", DistEnv())
    task.prepare()
    batch = task.batch(step, torch.Generator().manual_seed(seed))
    assert torch.equal(batch[key], task.batch(step, torch.Generator().manual_seed(seed))[key])     # resumable
    assert torch.equal(two_ranks(task, step, key, seed=seed), batch[key])
    plain = DCAETask(config(data), tmp_path / "b", DistEnv())
    plain.prepare()
    assert key not in plain.batch(step, torch.Generator())
    return task, batch


def test_batches_never_hold_out_images_and_split_across_ranks(data, tmp_path):
    task = DCAETask(config(data), tmp_path, DistEnv())
    task.prepare()
    steps = range(3 * task.order.per_epoch)
    seen = torch.cat([task.order(s)[1] for s in steps])
    assert seen.max().item() < N - N_EVAL and len(set(seen.tolist())) == N - N_EVAL
    whole = task.batch(7, torch.Generator().manual_seed(0))["images"]
    assert torch.equal(two_ranks(task, 7, "images"), whole)  # each of 2 processes takes its half of the batch


def test_crops_are_windows_of_the_cached_images_on_the_latent_grid(data, tmp_path):
    task = DCAETask(config(data, options={"crop": 16}), tmp_path, DistEnv())     # tiny: 2x compression
    task.prepare()
    # Pixels that make every window unique (flat shapes backgrounds match anywhere).
    task.images = torch.randint(0, 256, task.images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(3)
    crops = task.batch(5, g)["images"]
    _, idx = task.order(5)
    assert crops.shape == (4, 3, 16, 16)
    offsets = set()
    for crop, i in zip(crops, idx):
        full = task.images[i].float() / 127.5 - 1
        # Exactly one window of the image is this crop, at even offsets (the latent grid).
        hits = [(t, l) for t in range(0, SIZE - 15) for l in range(0, SIZE - 15)
                if torch.equal(full[:, t:t + 16, l:l + 16], crop)]
        assert len(hits) == 1 and hits[0][0] % 2 == 0 and hits[0][1] % 2 == 0
        offsets.add(hits[0])
    assert len(offsets) > 1                                   # offsets vary across the batch
    # Same step and generator state: same crops; each of 2 ranks gets its half of them.
    assert torch.equal(task.batch(5, torch.Generator().manual_seed(3))["images"], crops)
    assert torch.equal(two_ranks(task, 5, "images", seed=3), crops)
    with pytest.raises(ValueError, match="options.crop=15"):
        DCAETask(config(data, options={"crop": 15}), tmp_path, DistEnv())
    with pytest.raises(ValueError, match="options.crop=64"):
        config(data, options={"crop": 64})


def test_missing_or_empty_data_is_an_error_before_any_work(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        run = tmp_path / f"run-{folder.name}"
        with pytest.raises(DataError, match=re.escape(str(folder))):
            train(config(folder), run, progress=False)
        assert not (run / "checkpoints").exists() and not (run / "model").exists()


def test_too_few_training_images_is_an_error_naming_eval_samples(data, tmp_path):
    with pytest.raises(DataError, match=r"eval_samples=22 .* leave 2 for training.*batch_size=4"):
        DCAETask(config(data, options={"eval_samples": 22}), tmp_path, DistEnv()).prepare()


def test_a_corrupt_image_is_skipped_and_counted(tmp_path):
    write_wds(shapes.samples(8, SIZE, seed=1), tmp_path / "src", shard_size=8)
    members = []
    with tarfile.open(tmp_path / "src" / "shapes-000000.tar") as tf:
        for m in tf:
            payload = tf.extractfile(m).read()
            members.append((m.name, payload[: len(payload) // 2] if m.name.startswith("000000003.png") else payload))
    (tmp_path / "data").mkdir()
    with tarfile.open(tmp_path / "data" / "bad.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    task = DCAETask(config(tmp_path / "data", options={"eval_samples": 2}), tmp_path / "run", DistEnv())
    info = task.prepare()
    assert info["skipped"] == {"bad_image": 1} and info["samples"] == 5 and info["eval_samples"] == 2
    expected = images([0, 1, 2, 4, 5, 6, 7])                  # sample 3 is gone, the rest keep their order
    torch.testing.assert_close(task.images.float() / 127.5 - 1, expected, rtol=0, atol=1e-6)


def test_bad_settings_name_the_field(data, tmp_path):
    with pytest.raises(ValueError, match="options.resolution=33"):
        DCAETask(config(data, options={"resolution": 33}), tmp_path, DistEnv())     # tiny compresses 2x
    with pytest.raises(ValueError, match=r"unknown DCAEConfig fields \['width'\]"):
        DCAETask(config(data, model={"preset": "tiny", "width": 8}), tmp_path, DistEnv())
    with pytest.raises(ValueError, match="model='huge'"):
        DCAETask(config(data, model="huge"), tmp_path, DistEnv())
    with pytest.raises(ValueError, match="options.l1"):
        config(data, options={"l1": 0.0, "l2": 0.0})


def test_psnr_and_cover_crop_closed_forms():
    x = torch.zeros(2, 3, 8, 8)
    assert psnr(x + 0.2, x).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)   # 0.1 on [0, 1]: MSE 1e-2
    assert psnr(x + 5, x + 1).tolist() == pytest.approx([100.0, 100.0])        # clamped to 1: identical
    stripes = np.zeros((40, 120, 3), np.uint8)                 # red | green | blue thirds, 40 px each
    for i in range(3):
        stripes[:, 40 * i:40 * (i + 1), i] = 255
    out = cover_crop(stripes, 32, 32).transpose(2, 0, 1)     # short side 40 -> 32, centre crop of the green third
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8
    assert (out[1, :, 4:28] == 255).all() and (out[[0, 2], :, 4:28] == 0).all()


def first_batch_loss(data, path, options):
    """A fresh model's task loss on the first batch, with the images, latents and reconstructions behind it."""
    task = DCAETask(config(data, options), path, DistEnv())
    task.prepare()
    torch.manual_seed(0)
    model = task.build_model()
    batch = task.batch(0, torch.Generator())
    x = batch["images"]
    with torch.no_grad():
        z = model.encoder(x)
        return task.loss(model, batch), x, z, model.decoder(z)


def test_latent_penalty_adds_its_term_and_bounds_the_latent(data, tmp_path):
    loss, x, z, recon = first_batch_loss(data, tmp_path / "a", {"latent_l2": 0.5})
    err = recon - x
    expected = err.abs().mean() + err.square().mean() + 0.5 * z.square().mean()
    assert torch.allclose(loss, expected, rtol=1e-6)
    # Trained with and without it, the same run: the penalty keeps the latent smaller.
    stds = []
    for weight in (0.0, 0.5):
        out = train(config(data, {"latent_l2": weight}), tmp_path / f"w{weight}", progress=False)
        with torch.no_grad():
            stds.append(out["model"].encoder(images(range(N - N_EVAL))).std().item())
    assert stds[1] < 0.7 * stds[0], stds


def test_edge_loss_ignores_flat_offsets_and_weighs_outlines():
    x = -torch.ones(1, 3, 16, 16)
    x[..., 4:12, 4:12] = 1                                     # a white square on black
    assert edge_loss(x + 0.3, x).item() == pytest.approx(0.0, abs=1e-7)      # flat offset: no edge error
    # The square one pixel wider: a 2-high step along one column in each of 8 rows and 3 channels
    wider = x.clone()
    wider[..., 4:12, 12] = 1
    dx = 2 * (2 * 8 * 3) / (3 * 16 * 15)                       # the step's two neighbour differences per row
    dy = 2 * (2 * 3) / (3 * 15 * 16)                           # the new pixels' top and bottom edges
    assert edge_loss(wider, x).item() == pytest.approx(dx + dy, rel=1e-6)
    with pytest.raises(ValueError, match="options.edge"):
        train_dcae.DCAEOptions(edge=-1.0)


def test_edge_weight_adds_its_term_to_the_loss(data, tmp_path):
    loss, x, _, recon = first_batch_loss(data, tmp_path / "a", {"edge": 2.0})
    err = recon - x
    expected = err.abs().mean() + err.square().mean() + 2.0 * edge_loss(recon, x)
    assert torch.allclose(loss, expected, rtol=1e-6)


def test_latent_noise_is_relative_to_the_latent_rms_drawn_per_step_and_split_across_ranks(data, tmp_path):
    task, batch = drawn(data, tmp_path, {"latent_noise": 0.3}, "latent_noise", step=3, seed=7)
    noise = batch["latent_noise"]
    with torch.no_grad():
        assert noise.shape == task.build_model().encoder(batch["images"]).shape     # the latent's shape
    # The loss decodes z + noise * rms(z), rms per image; the penalty and reconstruction terms as without noise.
    torch.manual_seed(0)
    model = task.build_model()
    x = batch["images"]
    with torch.no_grad():
        z = model.encoder(x)
        rms = z.flatten(1).norm(dim=1).div(z[0].numel() ** 0.5)[:, None, None, None]
        err = model.decoder(z + noise * rms) - x
        expected = err.abs().mean() + err.square().mean()
        assert torch.allclose(task.loss(model, batch), expected, rtol=1e-6)
        clean = model.decoder(z) - x
        assert not torch.allclose(expected, clean.abs().mean() + clean.square().mean(), rtol=1e-3)
    with pytest.raises(ValueError, match="options.latent_noise"):
        config(data, {"latent_noise": -1.0})


def test_latent_mix_decodes_blends_of_neighbouring_latents_against_blended_images(data, tmp_path):
    task, batch = drawn(data, tmp_path, {"latent_mix": 0.5}, "mix", step=2, seed=3)
    a = batch["mix"]
    assert a.shape == (len(batch["images"]),) and (a >= 0).all() and (a <= 1).all() and a.std() > 0
    torch.manual_seed(0)
    model = task.build_model()
    x = batch["images"]
    with torch.no_grad():
        z = model.encoder(x)
        rec = model.decoder(z) - x
        w = a[:, None, None, None]
        prev = torch.cat([x[-1:], x[:-1]])                   # image i is blended with image i - 1
        blend = model.decoder(w * z + (1 - w) * torch.cat([z[-1:], z[:-1]])) - (w * x + (1 - w) * prev)
        expected = rec.abs().mean() + rec.square().mean() + 0.5 * (blend.abs().mean() + blend.square().mean())
        assert torch.allclose(task.loss(model, batch), expected, rtol=1e-5)
        # with every weight at 1 the blends are the reconstructions themselves: the loss is 1.5x the plain one
        ones = {**batch, "mix": torch.ones_like(a)}
        assert torch.allclose(task.loss(model, ones), 1.5 * (rec.abs().mean() + rec.square().mean()), rtol=1e-5)
    with pytest.raises(ValueError, match="options.latent_mix"):
        config(data, {"latent_mix": float("nan")})


def test_keep_channels_decodes_each_image_from_its_first_channels_only(data, tmp_path):
    task, batch = drawn(data, tmp_path, {"keep_channels": [1, 2, 4]}, "keep", step=5, seed=2)
    keep = batch["keep"]
    assert keep.shape == (len(batch["images"]),) and set(keep.tolist()) <= {1, 2, 4} and len(set(keep.tolist())) > 1
    torch.manual_seed(0)
    model = task.build_model()
    x = batch["images"]
    with torch.no_grad():
        z = model.encoder(x)
        cut = z.clone()
        for i, c in enumerate(keep.tolist()):
            cut[i, c:] = 0
        err = model.decoder(cut) - x
        expected = err.abs().mean() + err.square().mean()
        assert torch.allclose(task.loss(model, batch), expected, rtol=1e-5)
        whole = model.decoder(z) - x                          # keeping every channel is the plain loss
        full = {**batch, "keep": torch.full_like(keep, z.shape[1])}
        assert torch.allclose(task.loss(model, full), whole.abs().mean() + whole.square().mean(), rtol=1e-5)
        assert not torch.allclose(expected, whole.abs().mean() + whole.square().mean(), rtol=1e-3)
    with pytest.raises(ValueError, match="options.keep_channels"):
        config(data, {"keep_channels": [0]})
    with pytest.raises(ValueError, match="options.keep_channels"):
        DCAETask(config(data, {"keep_channels": [DCAE_PRESETS["tiny"].latent_channels + 1]}), tmp_path / "c",
                 DistEnv())


def test_anchor_pulls_the_first_channels_towards_the_pooled_image(data, tmp_path):
    task = DCAETask(config(data, {"anchor": 2.0, "anchor_gain": 1.5, "anchor_grid": 1}), tmp_path / "a", DistEnv())
    task.prepare()
    batch = task.batch(0, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = task.build_model()
    x, f = batch["images"], model.cfg.compression
    with torch.no_grad():
        z = model.encoder(x)
        err = model.decoder(z) - x
        median = x.flatten(2).median(dim=2).values[:, :, None, None]            # (B, 3, 1, 1)
        target = 1.5 * (torch.nn.functional.avg_pool2d(x, f) - median)          # (B, 3, H/f, W/f): one colour a cell
        expected = err.abs().mean() + err.square().mean() + 2.0 * (z[:, :3] - target).square().mean()
        assert torch.allclose(task.loss(model, batch), expected, rtol=1e-5)

    # grid 2: channel c * 4 + i * 2 + j holds colour c of sub-block (i, j) of each cell, written out by hand
    twelve = {"preset": "tiny", "latent_channels": 12, "widths": [12, 12]}
    wide = DCAETask(config(data, {"anchor": 1.0, "anchor_grid": 2}, model=twelve), tmp_path / "w", DistEnv())
    x = torch.full((2, 3, 8, 8), 0.25)                                  # the background: 0.25, the median
    x[:, :, :3, :3] = torch.randn(2, 3, 3, 3)                           # an "object" over 9 of 64 pixels
    pooled = torch.nn.functional.avg_pool2d(x, wide.model_cfg.compression // 2) - 0.25   # (2, 3, 4, 4)
    by_hand = torch.zeros(2, 12, 4, 4)
    for c in range(3):
        for i in range(2):
            for j in range(2):
                by_hand[:, c * 4 + i * 2 + j] = 3.0 * pooled[:, c, i::2, j::2]
    assert torch.allclose(wide.anchor_target(x), by_hand)

    # training with the anchor brings the first channels closer to the pooled held-out images than training without
    def anchor_error(options: dict, out: str) -> float:
        train(config(data, options), tmp_path / out)
        model = load_dcae(tmp_path / out / "model")
        x = images(range(N - N_EVAL, N))
        with torch.no_grad():
            z = model.encoder(x)                                                     # unscaled, as trained
        median = x.flatten(2).median(dim=2).values[:, :, None, None]
        return (z[:, :3] - (torch.nn.functional.avg_pool2d(x, model.cfg.compression) - median)).square().mean().item()
    assert anchor_error({"anchor": 1.0, "anchor_gain": 1.0, "anchor_grid": 1}, "on") < \
        0.5 * anchor_error({}, "off")

    for bad in ({"anchor": -1.0}, {"anchor_gain": 0.0}, {"anchor_grid": 0}):
        with pytest.raises(ValueError, match="options.anchor"):
            config(data, bad)
    with pytest.raises(ValueError, match="options.anchor_grid"):                  # 3 * 2^2 > 4 latent channels
        DCAETask(config(data, {"anchor": 1.0, "anchor_grid": 2}), tmp_path / "c", DistEnv())
