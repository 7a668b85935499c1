"""Peak memory of one CG-MLLM training step at Qwen3-VL-2B width: logits for the labelled rows only vs every row.

One sample = a short caption, then an object of N latent rows as a noisy block (flow loss), then a caption with
labels (CE). Two ways to compute the same loss:

* ``labelled``  the model's forward with ``labels``: ``lm_head`` runs on the rows that predict a label only
                (what the model and ``CGMLLMTrainer`` do now);
* ``all-rows``  ``lm_head`` on every row, float32 cross-entropy over the shifted labels (what the Trainer did
                before: the latent rows' logits are computed, upcast, and never read).

The model is Qwen3-VL-2B's text width (hidden 2048, 16 heads of 128, 8 KV heads, MLP 6144, vocabulary 151,936)
with ``--layers`` MoT decoder layers and a one-block vision tower, random weights. A step is forward + backward
(no optimizer state). Every (N, path) runs in a fresh worker process; the peak is on CUDA
``torch.cuda.max_memory_allocated``, on CPU the growth of the peak resident set (``VmHWM``) over the resident set
after building the model. Both paths' losses are printed to show they are the same number.

    python benchmarks/bench_train_memory.py                                 # N = 512 1024 2048 4096, 1 layer
    python benchmarks/bench_train_memory.py --sizes 512 1024 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


PATHS = ("labelled", "all-rows")


def build_model(layers: int, dtype: torch.dtype):
    from cgmllm import CGMLLMConfig, CGMLLMForConditionalGeneration

    config = CGMLLMConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=layers,
            num_attention_heads=16, num_key_value_heads=8, head_dim=128, pad_token_id=0,
            rope_parameters={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True,
                             "rope_theta": 5000000},
        ),
        vision_config=dict(depth=1, hidden_size=64, intermediate_size=64, num_heads=4, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        tie_word_embeddings=True,
    )
    config._attn_implementation = config.text_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return CGMLLMForConditionalGeneration(config).to(dtype).train()


def sample(config, num_rows: int):
    """`(1, L)` ids [caption, <obj_start>, N pads, <obj_end>, caption] and labels on the second caption."""
    prompt, caption = list(range(1000, 1016)), list(range(2000, 2024))
    ids = prompt + [config.obj_start_token_id] + [config.obj_pad_token_id] * num_rows + [config.obj_end_token_id]
    ids = torch.tensor([ids + caption])
    labels = torch.full_like(ids, -100)
    labels[0, -len(caption):] = ids[0, -len(caption):]
    return ids, labels


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args) -> dict:
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = build_model(args.layers, dtype).to(device)
    ids, labels = sample(model.config, args.size)
    ids, labels = ids.to(args.device), labels.to(args.device)
    latents = torch.randn(args.size, 64, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if cuda else _rss_kib("VmRSS") * 1024
    start = time.perf_counter()
    if args.path == "labelled":
        out = model(input_ids=ids, labels=labels, shape_latents=latents, generator=generator)
        lm_loss, flow_loss = out.lm_loss, out.flow_loss
    else:
        out = model(input_ids=ids, shape_latents=latents, generator=generator)
        logits = out.logits[:, :-1].float()
        lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        per_row = (out.velocity - out.velocity_target).pow(2).mean(-1)
        flow_loss = per_row[out.flow_loss_mask].mean()
    (lm_loss + flow_loss).backward()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) if cuda else _rss_kib("VmHWM") * 1024) - base
    return {"size": args.size, "path": args.path, "peak_gib": peak / 2**30, "seconds": seconds,
            "lm_loss": float(lm_loss), "flow_loss": float(flow_loss)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from cgmllm.training.devices import parse_device_argument

    parse_device_argument(parser, args.device)  # a missing GPU is a usage error here, not a failed worker
    if args.worker:
        print(json.dumps(worker(args)))
        return

    print(f"training step, hidden 2048, vocab 151936, {args.layers} layer(s), {args.dtype} on {args.device}")
    print(f"{'N':>6} {'path':>9} {'peak GiB':>9} {'s':>7} {'lm_loss':>9} {'flow_loss':>9}")
    for size in args.sizes:
        peaks = {}
        for path in args.paths:
            command = [sys.executable, __file__, "--worker", "--size", str(size), "--path", path,
                       "--layers", str(args.layers), "--dtype", args.dtype, "--device", args.device,
                       "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{size:>6} {path:>9} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            peaks[path] = row["peak_gib"]
            print(f"{size:>6} {path:>9} {row['peak_gib']:>9.2f} {row['seconds']:>7.1f} {row['lm_loss']:>9.4f} "
                  f"{row['flow_loss']:>9.4f}", flush=True)
        if len(peaks) == 2:
            print(f"{size:>6} all-rows / labelled peak: {peaks['all-rows'] / peaks['labelled']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
