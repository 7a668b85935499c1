"""First contact with the command line: start-up time of `cgmllm`, and the whole `cgmllm generate` per thread setting.

Start-up (best of `--repeats` fresh processes each; the goal of issue 19 is < 0.5 s for the first two, < 1.5 s
for `import cgmllm`):

* `cgmllm --help`
* an argument error (`cgmllm generate "a ball" -o out.txt`: unsupported extension)
* `python -c "import cgmllm"`
* `python -c "import cgmllm; cgmllm.CGMLLMPipeline"` (what a generating command imports before it can start)

Threads: the whole `cgmllm generate` command on the shipped tiny-world checkpoint (fresh process: import, load,
denoise, mesh, write) and, in a worker process, the denoising alone (`output_type="latent"`), for each `--threads`
value and for the command's default (no `--threads`: the idle cores, see `cgmllm.cli.default_num_threads`). The
1-minute load average is printed with the table: on a shared machine the best setting depends on it.

    python benchmarks/bench_cli.py                          # start-up + threads 1 / 2 / all cores / default
    python benchmarks/bench_cli.py --threads 1 2 --steps 50 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_run(command: list[str], repeats: int, env=None) -> tuple[float, subprocess.CompletedProcess]:
    """Best wall time of `repeats` fresh processes."""
    best, done = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        best = min(best, time.perf_counter() - start)
    return best, done


def cgmllm_command() -> list[str]:
    script = shutil.which("cgmllm")
    if script and Path(script).resolve().parent == Path(sys.executable).resolve().parent:
        return [script]
    return [sys.executable, "-m", "cgmllm.cli"]


def startup_rows(repeats: int) -> list[tuple[str, float, str]]:
    cgmllm = cgmllm_command()
    with tempfile.TemporaryDirectory() as folder:
        cases = [
            ("cgmllm --help", cgmllm + ["--help"], 0.5),
            ("cgmllm generate ... -o out.txt (argument error)", cgmllm + ["generate", "a ball", "-o",
                                                                         f"{folder}/out.txt"], 0.5),
            ("python -c 'import cgmllm'", [sys.executable, "-c", "import cgmllm"], 1.5),
            ("python -c 'import cgmllm; cgmllm.CGMLLMPipeline'",
             [sys.executable, "-c", "import cgmllm; cgmllm.CGMLLMPipeline"], None),
        ]
        rows = []
        for name, command, goal in cases:
            seconds, _ = timed_run(command, repeats)
            rows.append((name, seconds, f"< {goal} s" if goal else "-"))
    return rows


def denoise_worker(args) -> dict:
    """In-process: load the shipped pipeline, then time the denoising alone (best of `--repeats`)."""
    import torch

    from cgmllm import cli
    from cgmllm.pipelines import CGMLLMPipeline

    threads = args.worker_threads or cli.default_num_threads()
    torch.set_num_threads(threads)
    pipe = CGMLLMPipeline.from_pretrained(cli.default_model_dir())
    pipe.set_progress_bar_config(disable=True)
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        pipe(args.prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0),
             output_type="latent")
        best = min(best, time.perf_counter() - start)
    return {"threads": threads, "denoise_s": best}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes / runs per case (best is reported)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="thread counts to compare (default: 1, 2 and all cores), plus the command's default")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--prompt", default="a tall cylinder")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--worker-threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(denoise_worker(args)))
        return

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"python {sys.version.split()[0]}, {cores} cores, load average {os.getloadavg()[0]:.2f} at the start")
    if not args.skip_startup:
        print(f"\nstart-up (best of {args.repeats} fresh processes)")
        print(f"{'case':52} | {'wall s':>7} | goal")
        for name, seconds, goal in startup_rows(args.repeats):
            print(f"{name:52} | {seconds:7.2f} | {goal}")

    settings = [None] + sorted(set(args.threads or [1, 2, cores]))  # None = the command's default
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # let the default decide
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for threads in settings:
            flag = [] if threads is None else ["--threads", str(threads)]
            command = cgmllm_command() + ["generate", args.prompt, "-o", f"{folder}/x.glb", "--steps",
                                          str(args.steps), "--quiet", *flag]
            load = os.getloadavg()[0]
            whole, done = timed_run(command, args.repeats, env)
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
            worker = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--repeats",
                      str(args.repeats), "--prompt", args.prompt, "--worker-threads", str(threads or 0)]
            result = json.loads(subprocess.run(worker, capture_output=True, text=True, env=env,
                                               check=True).stdout.strip().splitlines()[-1])
            rows.append((threads, result["threads"], load, whole, result["denoise_s"]))

    print(f"\n`cgmllm generate \"{args.prompt}\" --steps {args.steps}` on the shipped tiny world, best of "
          f"{args.repeats}; denoising alone in-process")
    print(f"{'--threads':>12} | {'torch threads':>13} | {'load':>5} | {'command s':>9} | {'denoise s':>9} | "
          f"{'vs 1 thread':>11}")
    reference = next((r for r in rows if r[1] == 1), rows[0])
    for threads, used, load, whole, denoise in rows:
        label = "default" if threads is None else str(threads)
        print(f"{label:>12} | {used:13d} | {load:5.2f} | {whole:9.2f} | {denoise:9.2f} | "
              f"{denoise / reference[4]:10.2f}x")


if __name__ == "__main__":
    main()
