"""The training loop (sanaflow/train.py) through the DiT task: exact resume, faults, DDP, the recipe's sampling rules."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sanaflow import checkpoint, shapes
from sanaflow.data import write_folder, write_wds
from sanaflow.dcae import DCAE, DCAE_PRESETS
from sanaflow.hub import save_dcae
from sanaflow.train import (BatchOrder, DataError, DistEnv, TrainConfig, TrainingError, caption_weights, lr_at,
                            step_generator, train)
from sanaflow.train_dit import DiTTask
from tests.tiny_text import make_gemma, make_tokenizer

ONE_THREAD = True                           # tests/conftest.py: tiny models, one torch thread

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def frozen(tmp_path_factory) -> dict:
    """A shapes data set (24 images, 32 px), a random tiny DC-AE (2x, 4 channels) and a random tiny text encoder."""
    d = tmp_path_factory.mktemp("frozen")
    write_wds(shapes.samples(24, 32, seed=1), d / "data", shard_size=10)
    torch.manual_seed(0)
    save_dcae(DCAE(DCAE_PRESETS["tiny"]).eval(), d / "vae")
    tok = make_tokenizer(d / "text" / "tokenizer")
    make_gemma(len(tok)).save_pretrained(d / "text" / "text_encoder")
    return {"data": str(d / "data"), "vae": str(d / "vae"), "text_encoder": str(d / "text")}


def config(frozen: dict, **changes) -> TrainConfig:
    options = {"vae": frozen["vae"], "text_encoder": frozen["text_encoder"], "text_max_length": 24, "chi": False,
               "resolution": 16, **changes.pop("options", {})}
    fields = dict(task="dit", data=frozen["data"], model="tiny", options=options, steps=6, batch_size=4, lr=1e-3,
                  warmup_steps=2, grad_clip=1.0, save_every=100, log_every=1, seed=3)
    return TrainConfig(**{**fields, **changes})


def final_weights(run: Path, name: str = "model.safetensors") -> dict:
    return load_file(checkpoint.latest(run) / name)


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= atol, worst


def test_resume_is_exact(frozen, tmp_path):
    cfg = config(frozen, ema_decay=0.9)
    train(cfg, tmp_path / "whole", progress=False)
    train(cfg.replace(steps=2), tmp_path / "pieces", progress=False)      # stop after 2 steps ...
    train(cfg.replace(steps=4), tmp_path / "pieces", progress=False)      # ... rerun to 4 ...
    train(cfg, tmp_path / "pieces", progress=False)                       # ... and to 6
    assert_same(final_weights(tmp_path / "whole"), final_weights(tmp_path / "pieces"))
    assert_same(final_weights(tmp_path / "whole", "ema.safetensors"), final_weights(tmp_path / "pieces", "ema.safetensors"))
    # The resumed run's log has each step once, with the same losses as the uninterrupted run.
    logs = [[json.loads(line) for line in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in ("whole", "pieces")]
    losses = [[(e["step"], e["loss"]) for e in log if "loss" in e] for log in logs]
    assert losses[0] == losses[1] and [s for s, _ in losses[0]] == list(range(1, 7))
    # Sanity: the weights did change, and a different seed gives different weights.
    train(cfg.replace(seed=4), tmp_path / "other", progress=False)
    with pytest.raises(AssertionError):
        assert_same(final_weights(tmp_path / "whole"), final_weights(tmp_path / "other"))


def test_resume_refuses_a_different_config(frozen, tmp_path):
    train(config(frozen, steps=1), tmp_path, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(config(frozen, steps=2, lr=5e-3), tmp_path, progress=False)


def test_lr_schedule_warms_up_holds_and_decays_to_zero(frozen):
    cfg = config(frozen, steps=10, lr=1.0, warmup_steps=2, decay_steps=4)
    assert [lr_at(cfg, s) for s in range(10)] == [0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    assert [lr_at(cfg.replace(decay_steps=0), s) for s in range(4)] == [0.5, 1, 1, 1]
    with pytest.raises(ValueError, match="decay_steps"):
        config(frozen, decay_steps=-1)


def test_a_stable_run_can_be_cooled_down_later(frozen, tmp_path):
    # Warmup-stable-decay: 4 constant steps, then rerun with a 2-step decay = the whole schedule in one run.
    cooled = config(frozen, steps=6, decay_steps=2)
    train(cooled, tmp_path / "whole", progress=False)
    train(cooled.replace(steps=4, decay_steps=0), tmp_path / "pieces", progress=False)
    train(cooled, tmp_path / "pieces", progress=False)
    assert_same(final_weights(tmp_path / "whole"), final_weights(tmp_path / "pieces"))
    lrs = [json.loads(line).get("lr") for line in (tmp_path / "pieces" / "log.jsonl").read_text().splitlines()]
    assert [lr for lr in lrs if lr is not None][-2:] == [1e-3 * 2 / 2, 1e-3 * 1 / 2]


def test_resume_accepts_a_checkpoint_from_before_an_options_field_existed(frozen, tmp_path):
    train(config(frozen, steps=1), tmp_path, progress=False)
    state_file = checkpoint.latest(tmp_path) / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["options"]["y_norm_init"]                   # as written before the field was added
    state_file.write_text(json.dumps(state))
    assert train(config(frozen, steps=2), tmp_path, progress=False)["step"] == 2     # the default still matches
    with pytest.raises(ValueError, match="options"):                # ... and a different value does not
        train(config(frozen, steps=3, options={"y_norm_init": 1.0}), tmp_path, progress=False)


def test_y_norm_init_reaches_the_model(frozen, tmp_path):
    for value in (0.01, 1.0):
        task = DiTTask(config(frozen, options={"y_norm_init": value}), tmp_path, DistEnv())
        assert torch.all(task.build_model().y_norm.weight == value)


def test_training_lowers_the_loss_and_exports_a_loadable_model(frozen, tmp_path):
    from sanaflow.hub import load_dit
    cfg = config(frozen, steps=80, lr=3e-3, warmup_steps=5)
    env = DistEnv()
    task = DiTTask(cfg, tmp_path, env)
    task.prepare()
    torch.manual_seed(cfg.seed)
    init = task.build_model()
    batches = [task.batch(s, step_generator(99, s)) for s in range(6)]    # fixed held-aside t, noise, captions

    def loss(model) -> float:
        with torch.no_grad():
            return sum(task.loss(model, b).item() for b in batches) / len(batches)
    train(cfg, tmp_path, progress=False)
    trained = load_dit(tmp_path / "model")
    before, after = loss(init), loss(trained)
    assert after < 0.75 * before, (before, after)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(frozen, tmp_path, monkeypatch):
    cfg = config(frozen, steps=6, save_every=2)
    real_loss = DiTTask.loss
    calls = {"n": 0}

    def loss_with_nan_at_step_5(self, model, batch):
        calls["n"] += 1
        value = real_loss(self, model, batch)
        return value * float("nan") if calls["n"] == 5 else value
    monkeypatch.setattr(DiTTask, "loss", loss_with_nan_at_step_5)
    with pytest.raises(TrainingError, match=r"loss is nan at step 5.*step 4"):
        train(cfg, tmp_path, progress=False)
    assert checkpoint.latest(tmp_path).name == "step-000004"
    weights, *_ = checkpoint.load(checkpoint.latest(tmp_path))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_run_killed_while_saving_resumes_from_the_previous_checkpoint(frozen, tmp_path, monkeypatch):
    cfg = config(frozen, steps=6, save_every=2)
    train(cfg, tmp_path / "whole", progress=False)
    real_write = checkpoint._write

    def crash_on_second_state_json(path, write):
        if path.name == "state.json" and "step-000004" in str(path):
            real_write(path, lambda p: p.write_text('{"trunc'))        # half a file, then the process dies
            raise KeyboardInterrupt("killed")
        return real_write(path, write)
    monkeypatch.setattr(checkpoint, "_write", crash_on_second_state_json)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "killed", progress=False)
    assert checkpoint.latest(tmp_path / "killed").name == "step-000002"
    checkpoint.load(checkpoint.latest(tmp_path / "killed"))                # loadable
    monkeypatch.setattr(checkpoint, "_write", real_write)
    train(cfg, tmp_path / "killed", progress=False)                          # rerun = resume from step 2
    assert_same(final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed"))
    assert not list((tmp_path / "killed" / "checkpoints").glob("*.tmp"))


def test_missing_or_empty_data_is_an_error_before_any_work(frozen, tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        train(config(frozen, data=str(tmp_path / "nowhere")), tmp_path / "a", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable samples"):
        train(config(frozen, data=str(tmp_path / "empty")), tmp_path / "b", progress=False)
    with pytest.raises(DataError, match="vae"):
        train(config(frozen, options={"vae": str(tmp_path / "novae")}), tmp_path / "c", progress=False)
    for run in ("a", "b", "c"):
        assert checkpoint.latest(tmp_path / run) is None


def test_a_corrupt_sample_is_skipped_and_counted(frozen, tmp_path):
    folder = tmp_path / "data"
    write_folder(shapes.samples(9, 32, seed=2), folder)
    (folder / "000000003.png").write_bytes(b"not a png")
    summary = train(config(frozen, data=str(folder), steps=1), tmp_path / "run", progress=False)
    assert summary["samples"] == 8 and sum(summary["skipped"].values()) == 1


def test_batch_order_covers_each_sample_once_per_epoch_within_buckets():
    buckets = {"a": torch.arange(0, 10), "b": torch.arange(10, 17)}
    order = BatchOrder(buckets, batch_size=3, seed=0)
    assert order.per_epoch == 3 + 2
    epoch = [order(s) for s in range(order.per_epoch)]
    for key, idx in epoch:
        assert set(idx.tolist()) <= set(buckets[key].tolist())
    seen = torch.cat([idx for _, idx in epoch])
    assert len(set(seen.tolist())) == len(seen) == 15
    assert [i.tolist() for _, i in epoch] == [i.tolist() for _, i in (BatchOrder(buckets, 3, 0)(s) for s in range(5))]
    assert [i.tolist() for _, i in epoch] != [order(s)[1].tolist() for s in range(5, 10)]   # reshuffled next epoch
    with pytest.raises(DataError, match="batch_size=11"):
        BatchOrder(buckets, batch_size=11, seed=0)


def test_caption_weights_follow_the_spec_formulas():
    s = torch.tensor([0.2, 0.5, 1.0])
    w = caption_weights(s, "clipscore", 0.1, threshold=0.3)                # NVlabs: s^(1/T) above the threshold
    assert torch.allclose(w / w.sum(), torch.tensor([0.0, 0.5 ** 10, 1.0]) / (1 + 0.5 ** 10))
    assert caption_weights(s, "clipscore", 0.1, threshold=2.0).tolist() == [0, 0, 1]   # none passes: the best
    p = caption_weights(s, "softmax", 0.5, 0)                              # paper: exp(s / T)
    assert torch.allclose(p, torch.exp(s / 0.5) / torch.exp(s / 0.5).sum())


def test_batches_sample_t_and_captions_as_the_recipe_says(frozen, tmp_path):
    """Over many steps: logit(t) ~ N(mean, std) without shift; caption frequencies match their weights;
    the dropout rate matches; the flow shift maps t exactly."""
    cfg = config(frozen, batch_size=8, options={"discrete_time": False, "flow_shift": 1.0, "logit_mean": 0.5,
                                                "logit_std": 0.7, "caption_rule": "softmax",
                                                "caption_temperature": 0.3, "caption_dropout": 0.25})
    task = DiTTask(cfg, tmp_path, DistEnv())
    task.prepare()
    batches = [task.batch(s, step_generator(0, s)) for s in range(300)]
    z = torch.logit(torch.cat([b["t"] for b in batches]).double())
    assert abs(z.mean() - 0.5) < 0.05 and abs(z.std() - 0.7) < 0.05
    null = task.data["null_text"].float()[0]
    dropped = torch.cat([(b["text"] == null).flatten(1).all(1) for b in batches]).float().mean()
    assert abs(dropped - 0.25) < 0.04
    # Caption choice for one image with several captions: frequencies vs softmax(score / T).
    image = 0
    rows = torch.arange(task.first_caption[image], task.first_caption[image + 1])
    assert len(rows) > 1
    # The task's own draws for image 0 (whenever it is in a batch) match the same distribution.
    text = task.data["text"].float()
    own = [int(((text[rows] - b["text"][j]).abs().flatten(1).sum(1) == 0).nonzero()[0])
           for s, b in enumerate(batches) for j, i in enumerate(task.order(s)[1].tolist())
           if i == image and not (b["text"][j] == null).all()]
    expected = caption_weights(task.data["caption_score"][rows], "softmax", 0.3, 0)
    observed = torch.bincount(torch.tensor(own), minlength=len(rows)).float() / len(own)
    assert (observed - expected).abs().max() < 4 * math.sqrt(0.25 / len(own)) + 0.02
    # Shift: t = s u / (1 + (s - 1) u) for the same draws.
    shifted = DiTTask(cfg.replace(**{"options.flow_shift": 3.0}), tmp_path, DistEnv())
    shifted.prepare()
    u = batches[0]["t"]
    assert torch.allclose(shifted.batch(0, step_generator(0, 0))["t"], 3 * u / (1 + 2 * u))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_torchrun_processes_match_one_process(frozen, tmp_path, parallel):
    """torchrun, 2 processes on gloo: under DDP both ranks end with identical parameters; with DDP or FSDP the
    checkpoint equals (to float tolerance) one process training on the same global batch."""
    cfg = config(frozen, steps=4, batch_size=4, parallel=parallel)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    script = tmp_path / "run_rank.py"
    script.write_text(
        "import sys\nimport torch\nfrom safetensors.torch import save_file\nfrom sanaflow import train as tr\n"
        "cfg = tr.load_config(sys.argv[1])\nenv = tr.setup_distributed('cpu')\n"
        "model = tr.train(cfg, sys.argv[2], env=env, progress=False)['model']\n"
        "if cfg.parallel == 'ddp':   # each rank writes the full copy it holds\n"
        "    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f'{sys.argv[2]}/rank{env.rank}.st')\n"
        "env.close()   # leaves the group: a gloo process exiting inside it can abort\n"
        "assert not torch.distributed.is_initialized()\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(script), str(tmp_path / "cfg.json"), str(tmp_path / "multi")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    if parallel == "ddp":
        assert_same(*(load_file(tmp_path / "multi" / f"rank{r}.st") for r in (0, 1)))
    train(cfg.replace(parallel="ddp"), tmp_path / "single", progress=False)
    assert_same(final_weights(tmp_path / "multi"), final_weights(tmp_path / "single"), atol=1e-5)
    assert_same(final_weights(tmp_path / "multi"), dict(load_dit_weights(tmp_path / "multi" / "model")), atol=0)
    log = [json.loads(line) for line in (tmp_path / "multi" / "log.jsonl").read_text().splitlines()]
    assert log[0]["world"] == 2


def load_dit_weights(folder: Path) -> dict:
    from sanaflow.hub import load_dit
    return load_dit(folder).state_dict()


def test_cli_train_dry_run_resolves_presets_and_overrides(tmp_path):
    from click.testing import CliRunner
    from sanaflow.cli import main
    result = CliRunner().invoke(main, ["train", "--preset", "shapes-dit", "--dry-run", "--steps", "7",
                                       "--set", "lr=3e-4", "--set", "options.flow_shift=2", "--data", "d/x"])
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.output)
    assert (cfg["steps"], cfg["lr"], cfg["options"]["flow_shift"], cfg["data"], cfg["out"]) == \
        (7, 3e-4, 2, "d/x", str(Path("runs") / "shapes-dit"))
    bad = CliRunner().invoke(main, ["train", "--preset", "shapes-dit", "--dry-run", "--set", "options.nope=1"])
    assert bad.exit_code == 2 and "nope" in bad.output
    missing = CliRunner().invoke(main, ["train", "--preset", "shapes-text", "--data", str(tmp_path / "nowhere"),
                                        "--out", str(tmp_path / "run")])
    assert missing.exit_code == 1 and "nowhere" in missing.output


def test_cli_train_runs_and_resumes(frozen, tmp_path):
    from click.testing import CliRunner
    from sanaflow.cli import main
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(config(frozen, steps=2).to_dict()))
    args = ["train", "--config", str(cfg_file), "--out", str(tmp_path / "run"), "--device", "cpu"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, args + ["--steps", "3", "--resume"])
    assert again.exit_code == 0, again.output
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e.get("event") for e in events if "event" in e] == ["start", "resume"]
    assert checkpoint.latest(tmp_path / "run").name == "step-000003"


def test_export_assembles_the_pipeline_a_dit_run_trained_for(frozen, tmp_path):
    from click.testing import CliRunner
    from sanaflow.cli import main
    from sanaflow.pipeline import GenerateRequest, Pipeline
    from sanaflow.train_dit import pipeline_from_run
    train(config(frozen, steps=2), tmp_path / "run", progress=False)
    result = CliRunner().invoke(main, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "pipe")])
    assert result.exit_code == 0, result.output
    loaded = Pipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.text.config.max_length == 24 and loaded.text.config.chi is None    # what the DiT was trained on
    req = GenerateRequest(prompts=("a red circle",), height=32, width=32, steps=3, guidance=2.0, seeds=(0,))
    image = loaded.generate(req)
    assert image.shape == (1, 3, 32, 32)
    assert torch.allclose(image, pipeline_from_run(tmp_path / "run").generate(req), atol=1e-5)
    bad = CliRunner().invoke(main, ["export", str(frozen["vae"]), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "config.json" in bad.output



def test_export_takes_the_raw_weights_or_the_ema_of_the_newest_checkpoint(frozen, tmp_path):
    from click.testing import CliRunner

    from sanaflow.cli import main
    from sanaflow.hub import load_dit
    from sanaflow.train_dit import pipeline_from_run
    train(config(frozen, steps=3, ema_decay=0.5), tmp_path / "run", progress=False)
    raw, ema = final_weights(tmp_path / "run"), final_weights(tmp_path / "run", "ema.safetensors")
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)          # the two differ, so the choice is visible
    assert_same(pipeline_from_run(tmp_path / "run", "raw").dit.state_dict(), raw)
    assert_same(pipeline_from_run(tmp_path / "run", "ema").dit.state_dict(), ema)
    assert_same(pipeline_from_run(tmp_path / "run").dit.state_dict(), ema)   # the run exports its EMA
    result = CliRunner().invoke(main, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "pipe"),
                                       "--weights", "raw"])
    assert result.exit_code == 0, result.output
    assert_same(load_dit(tmp_path / "pipe" / "transformer").state_dict(), raw)
    train(config(frozen, steps=1), tmp_path / "plain", progress=False)
    bad = CliRunner().invoke(main, ["export", str(tmp_path / "plain"), "--out", str(tmp_path / "x"),
                                    "--weights", "ema"])
    assert bad.exit_code == 1 and "ema" in bad.output and not (tmp_path / "x").exists()

def test_aspect_ratio_buckets_keep_each_batch_one_shape(frozen, tmp_path):
    """Images of three aspect ratios (a user's image folder with .txt captions) land in three buckets; every batch
    is drawn from one bucket, with latents of that bucket's shape; training runs on them."""
    from PIL import Image
    from sanaflow.train_dit import bucket_sizes
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(32, 64), (64, 32), (32, 32)] * 4):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a picture {i}\nanother caption")
    cfg = config(frozen, data=str(folder), batch_size=2, steps=3, options={"resolution": 32, "buckets": True})
    task = DiTTask(cfg, tmp_path / "run", DistEnv())
    info = task.prepare()
    sizes = bucket_sizes(32, 2)
    expected = {f"{h}x{w}" for h, w in (sizes["0.5"], sizes["2.0"], sizes["1.0"])}
    assert set(info["buckets"]) == expected and all(n == 4 for n in info["buckets"].values())
    shapes_seen = set()
    for step in range(task.order.per_epoch):
        (h, w), idx = task.order(step)
        b = task.batch(step, step_generator(0, step))
        assert b["x0"].shape == (2, 4, h, w) and (task.data["image_shape"][idx] == torch.tensor([h, w])).all()
        shapes_seen.add((h, w))
    assert len(shapes_seen) == 3
    train(cfg, tmp_path / "run", progress=False)


def test_trimming_text_padding_does_not_change_the_dit_output(frozen, tmp_path):
    """Batches carry only the text columns some caption uses; the DiT's output equals that on the full padded cache."""
    task = DiTTask(config(frozen, options={"text_max_length": 300}), tmp_path, DistEnv())
    task.prepare()
    torch.manual_seed(0)
    model = task.build_model()
    trimmed = 0
    for step in range(3):
        b = task.batch(step, step_generator(0, step))
        full = task.data["text"].shape[1]
        assert b["text"].shape[1] == int(b["mask"].sum(1).max()) <= full
        pad = full - b["text"].shape[1]
        text = torch.nn.functional.pad(b["text"], (0, 0, 0, pad))
        mask = torch.nn.functional.pad(b["mask"], (0, pad))
        t = b["t"] * 1000
        x = b["x0"]
        trimmed += pad > 0
        with torch.no_grad():
            # Padding gets exactly zero attention weight; only the matmuls' summation order differs.
            torch.testing.assert_close(model(x, t, b["text"], b["mask"]), model(x, t, text, mask), atol=1e-6, rtol=1e-5)
    assert trimmed


def test_zero_weight_captions_are_never_drawn(frozen, tmp_path):
    """rule "best": every other caption of an image has weight 0 and must never be chosen."""
    task = DiTTask(config(frozen, batch_size=8, options={"caption_rule": "best", "caption_dropout": 0.0}),
                   tmp_path, DistEnv())
    task.prepare()
    text, scores = task.data["text"].float(), task.data["caption_score"]
    for step in range(20):
        _, idx = task.order(step)
        b = task.batch(step, step_generator(0, step))
        for j, i in enumerate(idx.tolist()):
            rows = torch.arange(task.first_caption[i], task.first_caption[i + 1])
            match = rows[((text[rows][:, :b["text"].shape[1]] - b["text"][j]).abs().flatten(1).sum(1) == 0)]
            assert len(match) >= 1 and scores[match].max() == scores[rows].max()


def test_ema_after_one_step_is_the_decayed_average(frozen, tmp_path):
    from sanaflow.train_dit import DiTTask as Task
    cfg = config(frozen, steps=1, ema_decay=0.9)
    train(cfg, tmp_path / "run", progress=False)
    task = Task(cfg, tmp_path / "x", DistEnv())
    torch.manual_seed(cfg.seed)
    init = task.build_model().state_dict()                     # the loop's initial weights: same seed, same init
    weights, ema = final_weights(tmp_path / "run"), final_weights(tmp_path / "run", "ema.safetensors")
    worst = max((ema[k] - (0.9 * init[k] + 0.1 * weights[k])).abs().max().item() for k in ema)
    assert worst < 1e-6 and any(not torch.equal(init[k], weights[k]) for k in init)


def test_cached_caption_embeddings_equal_the_pipelines_encoding(frozen, tmp_path):
    """The cache encodes captions in length order, padded to each batch's longest: the real tokens' embeddings and
    the masks equal those of TextEncoder.encode at the full padded length, as the pipeline computes them."""
    from sanaflow.data import captions_from_json
    from sanaflow.train import open_dataset
    from sanaflow.train_dit import text_encoder
    cfg = config(frozen, options={"encode_batch": 5})
    task = DiTTask(cfg, tmp_path, DistEnv())
    task.prepare()
    # The cache's caption order: image by image, each image's captions best first.
    texts = [c["text"] for s in open_dataset(frozen["data"])
             for c in sorted(captions_from_json(s.meta), key=lambda c: -(c["score"] or 0)) if c["text"]]
    text, mask = text_encoder(cfg.options).encode(texts)                   # (n, N, D), (n, N)
    n = task.data["text"].shape[1]
    cached, cached_mask = task.data["text"].float(), task.data["text_mask"]
    assert len(cached) == len(texts) and int(mask.sum(1).max()) <= n
    assert torch.equal(cached_mask, mask[:, :n]) and mask[:, n:].sum() == 0
    keep = cached_mask[..., None].bool()
    torch.testing.assert_close(cached * keep, (text[:, :n] * keep).half().float(), atol=1e-3, rtol=1e-3)
    assert len({int(m.sum()) for m in cached_mask}) > 1                   # captions of several lengths


def test_loss_channels_average_each_images_error_over_its_first_channels(frozen, tmp_path):
    task = DiTTask(config(frozen, options={"loss_channels": [1, 2, 4]}), tmp_path / "a", DistEnv())
    task.prepare()
    batch = task.batch(3, step_generator(5, 3))
    c = batch["loss_channels"]
    assert c.shape == (4,) and set(c.tolist()) <= {1, 2, 4} and len(set(c.tolist())) > 1
    assert torch.equal(c, task.batch(3, step_generator(5, 3))["loss_channels"])         # resumable
    torch.manual_seed(0)
    model = task.build_model()
    with torch.no_grad():
        t = batch["t"]
        x_t = (1 - t)[:, None, None, None] * batch["x0"] + t[:, None, None, None] * batch["noise"]
        err = model(x_t, (t * 1000).floor(), batch["text"], batch["mask"]) - (batch["noise"] - batch["x0"])
        expected = torch.stack([err[i, :k].square().mean() for i, k in enumerate(c.tolist())]).mean()
        assert torch.allclose(task.loss(model, batch), expected, rtol=1e-5)
        # every channel kept: the plain MSE
        whole = {**batch, "loss_channels": torch.full_like(c, 4)}
        assert torch.allclose(task.loss(model, whole), err.square().mean(), rtol=1e-5)
        assert not torch.allclose(expected, err.square().mean(), rtol=1e-3)
    plain = DiTTask(config(frozen), tmp_path / "b", DistEnv())
    plain.prepare()
    assert "loss_channels" not in plain.batch(3, step_generator(5, 3))
    with pytest.raises(ValueError, match="options.loss_channels"):
        config(frozen, options={"loss_channels": [0]})
    with pytest.raises(ValueError, match="options.loss_channels"):
        DiTTask(config(frozen, options={"loss_channels": [5]}), tmp_path / "c", DistEnv())
