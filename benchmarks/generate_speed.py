"""How long the bundled model takes to draw one image on this machine (issue 7 targets: <= 0.5 s for a 20-step image
after loading; <= 5 s for the whole `sanaflow generate` command, process start to PNG written).

Three figures, medians over --rounds:
  - load: Pipeline.from_pretrained of the model folder (in this process, after imports);
  - image: one GenerateRequest (prompt encoding, 20 Flow-DPM-Solver steps with guidance, decoding), after a warm-up;
    the same with its parts timed separately (text encoder, sampler, DC-AE decoder);
  - command: `sanaflow generate PROMPT -o tmp.png` as a fresh process, wall clock from spawn to exit, and the
    time of `python -c "import sanaflow.pipeline"` alone, which is what the command pays before any work.

    python benchmarks/generate_speed.py                       # the bundled model, torch's default threads
    python benchmarks/generate_speed.py --model runs/pipe --rounds 9 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sanaflow.pipeline import BUNDLED, GenerateRequest, Pipeline

PROMPT = "a red circle to the left of a blue square"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=BUNDLED, help="a pipeline folder (default: the bundled model)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    loads = [timed(lambda: Pipeline.from_pretrained(args.model)) for _ in range(3)]
    pipe = Pipeline.from_pretrained(args.model)
    size = pipe.native_size
    req = GenerateRequest(prompts=(PROMPT,), height=size, width=size, steps=args.steps)
    pipe.generate(req)                                                       # warm-up
    whole = [timed(lambda: pipe.generate(req)) for _ in range(args.rounds)]

    text = [timed(lambda: pipe.text.encode_for_cfg(PROMPT)) for _ in range(args.rounds)]
    latent = pipe.generate(req, output="latent")
    decode = [timed(lambda: pipe.vae.decode(latent)) for _ in range(args.rounds)]

    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(sys.executable).with_name("sanaflow")
        cmd = [str(exe), "generate", PROMPT, "-o", str(Path(tmp) / "out.png"), "--steps", str(args.steps)]
        if args.model != BUNDLED:
            cmd += ["--model", str(args.model)]
        command = [timed(lambda: subprocess.run(cmd, check=True, capture_output=True)) for _ in range(3)]
        imports = [timed(lambda: subprocess.run([sys.executable, "-c", "import sanaflow.pipeline"], check=True))
                   for _ in range(3)]

    med = statistics.median
    print(f"model {args.model} ({size}x{size}), {args.steps} Flow-DPM-Solver steps, guidance {pipe.guidance_of(req)}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.rounds} rounds "
          f"(load, command and import: of 3)\n")
    print("| what | seconds |")
    print("|---|---:|")
    print(f"| load the pipeline (from_pretrained) | {med(loads):.3f} |")
    print(f"| one image, prompt to pixels | **{med(whole):.3f}** |")
    print(f"| - text encoder (prompt + negative) | {med(text):.3f} |")
    calls = "1 DiT call" if pipe.guidance_of(req) == 1 else "2 branches"    # guidance 1: no null branch
    print(f"| - sampler ({args.steps} steps x {calls}) | {med(whole) - med(text) - med(decode):.3f} |")
    print(f"| - DC-AE decode | {med(decode):.3f} |")
    print(f"| `import sanaflow.pipeline` in a fresh process | {med(imports):.3f} |")
    print(f"| whole `sanaflow generate` command, spawn to exit | **{med(command):.3f}** |")


if __name__ == "__main__":
    main()
