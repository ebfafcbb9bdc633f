"""`sanaflow` command line: a thin shell over the library (each command parses, calls one function, writes)."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import click


@click.group()
@click.version_option(package_name="sanaflow")
def main() -> None:
    """SANA text-to-image in plain PyTorch."""


@main.command()
@click.argument("prompt")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("sanaflow.png"),
              show_default=True, help="PNG to write; with --num-images N > 1, files OUT-0.png ... OUT-(N-1).png.")
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Local diffusers-format SANA folder (default: the bundled model).")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--guidance", type=float, default=None,
              help="Classifier-free guidance scale. Default: the model's (4.5 for official SANA folders).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the first image; image i uses seed + i.")
@click.option("--height", type=click.IntRange(min=32), default=None, help="Default: the model's native size.")
@click.option("--width", type=click.IntRange(min=32), default=None, help="Default: the model's native size.")
@click.option("--sampler", type=click.Choice(["dpm", "euler"]), default="dpm", show_default=True)
@click.option("--num-images", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--negative-prompt", default="", help="Text to steer away from.")
@click.option("--resolution-binning", is_flag=True,
              help="Generate at the nearest SANA aspect-ratio bin, then resize and crop to --height x --width.")
@click.option("--candidates", type=click.IntRange(min=1), default=1, show_default=True,
              help="Noise search: draw this many starting noises per image and keep the best by --search "
                   "(costs about that many generations; docs/noise-search.md).")
@click.option("--search", "search_score", type=click.Choice(["stability", "curvature", "prompt"]),
              default="stability", show_default=True, help="The score that picks among --candidates.")
@click.option("--dry-run", is_flag=True, help="Print the resolved request and exit.")
def generate(prompt: str, out: Path, model: Path | None, steps: int, guidance: float | None, seed: int,
             height: int | None, width: int | None, sampler: str, num_images: int, negative_prompt: str,
             resolution_binning: bool, candidates: int, search_score: str, dry_run: bool) -> None:
    """Generate an image from PROMPT and write it as a PNG (parameters go into its text metadata)."""
    from tqdm import tqdm
    from .pipeline import GenerateRequest, Pipeline, load_default, save_png

    start = time.perf_counter()
    pipe = Pipeline.from_pretrained(model) if model is not None else load_default()
    if pipe.name == "random-small":
        click.echo("note: the bundled model (sanaflow/assets/model) is missing from this installation; using a "
                   "small pipeline with RANDOM weights, so the image will be noise-like, not a picture of the prompt. "
                   "Pass --model PATH to a local diffusers-format SANA folder for real images.", err=True)
    size = pipe.native_size
    try:
        req = GenerateRequest(prompts=(prompt,), negative_prompt=negative_prompt, height=height or size,
                              width=width or size, steps=steps, guidance=guidance, sampler=sampler,
                              seeds=tuple(range(seed, seed + num_images)), images_per_prompt=num_images,
                              resolution_binning=resolution_binning)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    search = {"candidates": candidates, "search": search_score} if candidates > 1 else {}
    if dry_run:
        return click.echo(json.dumps({**dataclasses.asdict(req), "guidance": pipe.guidance_of(req), "model": pipe.name,
                                      **search}, indent=2))
    seeds = req.seeds
    if candidates > 1:
        from .noise_search import search as noise_search
        found = noise_search(pipe, req, candidates, search_score)
        images, seeds = pipe.decode(found.latents, req.height, req.width), found.seeds
    else:
        with tqdm(total=steps, desc="sampling", unit="step", leave=False) as bar:
            images = pipe.generate(req, callback=lambda i, n, x: bar.update(1))
    paths = [out] if num_images == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}")
                                           for i in range(num_images)]
    for image, path, s in zip(images, paths, seeds):
        # "seed" is the seed of the noise the image was drawn from (with a search, the kept candidate's): plain
        # generation with it redraws the image
        meta = {"prompt": prompt, "negative_prompt": negative_prompt, "steps": steps, "guidance": pipe.guidance_of(req),
                "seed": s, "sampler": sampler, "height": req.height, "width": req.width,
                "resolution_binning": resolution_binning, "model": pipe.name, **search,
                "software": "sanaflow"}
        save_png(image, path, meta)
        click.echo(f"wrote {path} ({req.width}x{req.height}, seed {s})")
    click.echo(f"done in {time.perf_counter() - start:.1f} s", err=True)


@main.group()
def data() -> None:
    """Make training data."""


@data.command("shapes")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--num", type=click.IntRange(min=1), required=True, help="Number of images.")
@click.option("--size", type=click.IntRange(min=32), default=256, show_default=True, help="Image side in pixels.")
@click.option("--format", "fmt", type=click.Choice(["wds", "folder"]), default="wds", show_default=True,
              help="WebDataset tar shards (image + json) or a plain folder.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--held-out", is_flag=True, help="Scenes and phrasings kept out of training (for evaluation).")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--grid", type=click.IntRange(min=0), default=0, show_default=True,
              help="Object centres on the cell centres of a GRID x GRID lattice (0: anywhere).")
@click.option("--max-objects", type=click.IntRange(min=1, max=4), default=4, show_default=True,
              help="At most this many objects per scene (1 to 4).")
def data_shapes(out: Path, num: int, size: int, fmt: str, seed: int, held_out: bool, shard_size: int,
                grid: int, max_objects: int) -> None:
    """Render the synthetic shapes data set: flat shapes on plain backgrounds, several scored captions each."""
    from .data import write_folder, write_wds
    from .shapes import samples
    items = samples(num, size, seed, held_out, grid=grid, max_objects=max_objects)
    if fmt == "wds":
        paths = write_wds(items, out, shard_size=shard_size, prefix="shapes-heldout" if held_out else "shapes",
                          progress=True, total=num)
        click.echo(f"wrote {num} samples in {len(paths)} shards to {out}")
    else:
        click.echo(f"wrote {write_folder(items, out, progress=True, total=num)} samples to {out}")


@main.command("eval")
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Local diffusers-format SANA folder (default: the bundled model).")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSON-lines prompt file (sanaflow.geneval.save_prompts); default: the held-out prompt set.")
@click.option("--split", type=click.Choice(["held-out", "train"]), default="held-out", show_default=True,
              help="Built-in prompt set when --prompts is not given.")
@click.option("--per-category", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--images-per-prompt", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--guidance", type=float, default=None, help="Default: the model's guidance scale.")
@click.option("--sampler", type=click.Choice(["dpm", "euler"]), default="dpm", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("eval"), show_default=True)
def evaluate(model: Path | None, prompts_file: Path | None, split: str, per_category: int, images_per_prompt: int,
             steps: int, guidance: float | None, sampler: str, seed: int, out: Path) -> None:
    """GenEval-style evaluation with the offline shapes detector: report.json, report.md and grid.png in OUT."""
    import numpy as np
    from .geneval import evaluate_pipeline, load_prompts, prompt_set, write_report
    from .pipeline import GenerateRequest, Pipeline, load_default

    pipe = Pipeline.from_pretrained(model) if model is not None else load_default()
    prompts = load_prompts(prompts_file) if prompts_file else prompt_set(split == "held-out", seed, per_category)

    def generate_fn(texts: list[str], seeds: list[int]) -> np.ndarray:
        req = GenerateRequest(prompts=tuple(texts), height=pipe.native_size, width=pipe.native_size, steps=steps,
                              guidance=guidance, sampler=sampler, seeds=tuple(seeds))
        return (pipe.generate(req).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)

    report = evaluate_pipeline(generate_fn, prompts, images_per_prompt=images_per_prompt, seed=seed)
    write_report(report, out)
    recall = report.item_recall()
    click.echo(f"guidance {pipe.guidance if guidance is None else guidance:g}, {steps} {sampler} steps")
    click.echo(f"overall {report.overall:.3f} ({len(prompts)} prompts x {images_per_prompt} images); item recall "
               f"{recall['shape']:.3f} by shape, {recall['shape_color']:.3f} by shape and colour; report in {out}")


def _parse_set(items: tuple[str, ...]) -> dict:
    changes = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE, e.g. lr=3e-4 or options.flow_shift=2",
                                     param_hint="--set")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value                   # a bare string, e.g. options.vae=runs/ae/model
    return changes


@main.command()
@click.option("--preset", default=None, help="A named run (sanaflow.train.TRAIN_PRESETS), e.g. shapes-dit.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A JSON training config (as written to RUN/config.json).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder: checkpoints, log.jsonl, config.json, model/. Default: runs/<preset or config name>.")
@click.option("--data", default=None, help="Data folder (overrides the config's).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Train up to this step (overrides).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a config field (JSON value), e.g. --set lr=3e-4 --set options.flow_shift=2.")
@click.option("--resume", is_flag=True, help="Require an existing checkpoint in --out (rerunning always resumes).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and exit.")
def train(preset: str | None, config_file: Path | None, out: Path | None, data: str | None, steps: int | None,
          sets: tuple[str, ...], resume: bool, device: str, dry_run: bool) -> None:
    """Train the DiT, the DC-AE or the text encoder; rerunning the same command resumes from the last checkpoint.

    Under `torchrun --nproc_per_node N`, each process trains on its slice of the batch (DDP, or FSDP with
    --set parallel=\"fsdp\")."""
    from . import train as tr
    if (preset is None) == (config_file is None):
        raise click.UsageError("give exactly one of --preset NAME or --config FILE")
    try:
        cfg = tr.preset(preset) if preset else tr.load_config(config_file)
        changes = _parse_set(sets)
        if data is not None:
            changes["data"] = data
        if steps is not None:
            changes["steps"] = steps
        cfg = cfg.replace(**changes) if changes else cfg
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise click.BadParameter(str(e), param_hint="--preset/--config/--set") from e
    out = out or Path("runs") / (preset or config_file.stem)
    if dry_run:
        return click.echo(json.dumps({"out": str(out), **cfg.to_dict()}, indent=2))
    env = tr.setup_distributed(device)
    try:
        summary = tr.train(cfg, out, env=env, require_checkpoint=resume)
    except (tr.DataError, tr.TrainingError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    finally:
        env.close()
    if summary.get("rank", 0) == 0:
        last = "nothing left to train" if summary["loss"] != summary["loss"] else f"last loss {summary['loss']:.4g}"
        click.echo(f"trained {cfg.task} to step {summary['step']} ({last}); model in {out / 'model'}")



@main.command("export")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The diffusers-format SanaPipeline folder to write (replaced atomically).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="Storage dtype of the weights; loading casts back to the dtype asked for.")
@click.option("--weights", type=click.Choice(["export", "raw", "ema"]), default="export", show_default=True,
              help="The DiT weights: RUN/model as the run exported it (its EMA if it kept one), or the newest "
                   "checkpoint's raw trained weights or EMA.")
@click.option("--guidance", type=float, default=4.5, show_default=True,
              help="The folder's default guidance scale (what generate and eval use unless told).")
def export(run: Path, out: Path, dtype: str, weights: str, guidance: float) -> None:
    """Assemble the pipeline a finished DiT RUN trained for (its DiT, autoencoder, text encoder, text settings and
    flow shift) into one folder that `sanaflow generate --model` and diffusers' SanaPipeline load."""
    import torch
    from .checkpoint import CheckpointError
    from .train_dit import pipeline_from_run
    try:
        pipe = pipeline_from_run(run, weights, guidance)
    except (ValueError, FileNotFoundError, OSError, CheckpointError) as e:
        raise click.ClickException(str(e)) from e
    to = getattr(torch, dtype)
    for net in (pipe.dit, pipe.vae, pipe.text.model):
        net.to(to)
    pipe.save_pretrained(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    click.echo(f"wrote {out} ({size / 2**20:.1f} MiB, {dtype})")


if __name__ == "__main__":
    main()
