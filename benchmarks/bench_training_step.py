"""Training steps per second of the tiny-world models on the CPU: eager vs `torch.compile`, and batch size.

The tiny models are overhead-bound on a CPU (thousands of small ops per step), so the question is which of the
standard levers makes a step cheaper without changing what is computed:

* ``compile``  `torch.compile` of the loss computation (inductor, default mode; graph breaks allowed), against eager;
* ``batch``    samples per second at several batch sizes (same work per sample, fewer steps for the same data).

Both models have the shipped tiny-world checkpoint's sizes (`checkpoints/tiny-world`: a 64 x 16 ShapeVAE and a
hidden-128, 4-layer CG-MLLM), freshly initialised; the CG-MLLM batch comes from the training collator (text -> 3D
and 3D -> caption at N = 64). Each variant runs its warm-up (compilation included, reported apart), then
`--steps` timed steps; the variants alternate in rounds so that load from other processes hits them alike.

    python benchmarks/bench_training_step.py [--steps 20 --rounds 3 --threads 2 --batch-sizes 8 16 32]
    python benchmarks/bench_training_step.py --device cuda --batch-sizes 16 64 256   # on a GPU: pick --batch-scale

With `--device cuda` the models and batches live on the GPU and every timed run ends with a synchronisation, so the
rates are the GPU's; the samples/s by batch size say which recipe `--batch-scale` keeps the GPU busy.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def shipped_folder():
    from cgmllm.cli import default_model_dir

    folder = default_model_dir()
    if folder is None:
        raise SystemExit("the shipped checkpoints/tiny-world folder is missing")
    return folder


def vae_step_factory(batch_size: int, compiled: bool, device: torch.device, queries: int = 1024):
    from cgmllm.modeling_shape_vae import ShapeVAE

    torch.manual_seed(0)
    vae = ShapeVAE.from_config(ShapeVAE.load_config(shipped_folder() / "vae")).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    points_per_mesh = vae.config.pc_size + vae.config.pc_sharpedge_size
    xyz = rng.normal(size=(batch_size, points_per_mesh, 3))
    xyz /= np.linalg.norm(xyz, axis=-1, keepdims=True)
    surface = np.concatenate([xyz * 0.9, xyz, np.zeros((batch_size, points_per_mesh, 1))], -1).astype(np.float32)
    query = rng.uniform(-1, 1, size=(batch_size, queries, 3)).astype(np.float32)
    labels = (np.linalg.norm(query, axis=-1) < 0.9).astype(np.float32)
    surface, query, labels = (torch.from_numpy(array).to(device) for array in (surface, query, labels))

    def loss_fn(surface, query, labels):
        return vae.compute_loss(surface, query, labels, sample_posterior=False).loss

    loss = torch.compile(loss_fn) if compiled else loss_fn

    def step():
        value = loss(surface, query, labels)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()

    return step


def model_step_factory(batch_size: int, compiled: bool, device: torch.device):
    from cgmllm import CGMLLMConfig, CGMLLMForConditionalGeneration, CGMLLMProcessor
    from cgmllm.training.collator import CGMLLMDataCollator

    folder = shipped_folder()
    config = CGMLLMConfig.from_pretrained(folder / "model")
    torch.manual_seed(0)
    model = CGMLLMForConditionalGeneration(config).to(device).train()
    processor = CGMLLMProcessor.from_pretrained(folder / "processor")
    n = config.num_shape_tokens
    collator = CGMLLMDataCollator(processor, n, task_weights={"text_to_shape": 1.0, "shape_caption": 1.0},
                                  condition_dropout=0.1, seed=0)
    rng = np.random.default_rng(0)
    examples = [{"uid": str(i), "caption": "a tall cylinder lying on its side",
                 "latents": rng.normal(size=(n, config.shape_latent_channels)).astype(np.float32)}
                for i in range(batch_size)]
    batch = {name: value.to(device) if torch.is_tensor(value) else value for name, value in collator(examples).items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compiled else model

    def step():
        loss = forward(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure(step, steps: int, device: torch.device) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":  # the steps were only queued
        torch.cuda.synchronize(device)
    return steps / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    from cgmllm.training.devices import describe_device, parse_device_argument

    device = parse_device_argument(parser, args.device)
    torch.set_num_threads(args.threads)

    variants = {}
    for model, factory, batch in (("ShapeVAE", vae_step_factory, 16), ("CG-MLLM", model_step_factory, 8)):
        for compiled in (False, True):
            variants[(model, "compile" if compiled else "eager", batch)] = (factory, batch, compiled)
    for batch in args.batch_sizes:
        variants.setdefault(("ShapeVAE", "eager", batch), (vae_step_factory, batch, False))
        variants.setdefault(("CG-MLLM", "eager", batch), (model_step_factory, batch, False))

    steps, warmup = {}, {}
    for key, (factory, batch, compiled) in variants.items():
        steps[key] = factory(batch, compiled, device)
        start = time.perf_counter()
        steps[key]()  # warm-up: compilation for the compiled variants
        steps[key]()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        warmup[key] = time.perf_counter() - start
    rates = {key: [] for key in variants}
    for _ in range(args.rounds):
        for key, step in steps.items():
            rates[key].append(measure(step, args.steps, device))
    median = {key: float(np.median(values)) for key, values in rates.items()}

    print(f"torch {torch.__version__}, {describe_device(device)}, {args.steps} steps x {args.rounds} rounds (median)")
    print(f"{'model':9s} {'variant':8s} {'batch':>5s} {'steps/s':>8s} {'samples/s':>9s} {'warm-up s':>9s}")
    for (model, variant, batch), rate in sorted(median.items()):
        print(f"{model:9s} {variant:8s} {batch:5d} {rate:8.2f} {rate * batch:9.1f} {warmup[(model, variant, batch)]:9.1f}")
    for model, batch in (("ShapeVAE", 16), ("CG-MLLM", 8)):
        ratio = median[(model, "compile", batch)] / median[(model, "eager", batch)]
        print(f"{model}: torch.compile / eager = {ratio:.2f}x steps per second at batch {batch}")
    for model in ("ShapeVAE", "CG-MLLM"):
        sizes = sorted(b for (m, v, b) in median if m == model and v == "eager")
        base = median[(model, "eager", sizes[0])] * sizes[0]
        print(f"{model}: samples/s relative to batch {sizes[0]}: " + ", ".join(
            f"batch {b} {median[(model, 'eager', b)] * b / base:.2f}x" for b in sizes))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({" ".join(map(str, key)): {"steps_per_s": median[key], "warmup_s": warmup[key]}
                       for key in median}, handle, indent=2)


if __name__ == "__main__":
    main()
