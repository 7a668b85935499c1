"""Wall time and peak memory of CG-MLLM shape generation: whole-object block vs token-by-token vs no KV cache.

Three samplers of the same flow (S Euler steps, batched CFG, same prompt):

* ``block``    whole object in one block (K = N): prefill once, S passes of N + 2 rows against the read-only cache;
* ``token``    token by token (K = 1): N sequential blocks of one row, S passes each, plus one cache write per row;
* ``nocache``  whole object, but every step recomputes the full sequence [prompt, block] (no KV cache).

Every (N, sampler) runs in a fresh worker process so that peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the growth of the process' peak resident set (``VmHWM``) over its
resident set just before sampling. Without ``--pipeline`` a small random model is built (fixed seed), which
measures the sampler structure, not the 2B model.

    python benchmarks/bench_generation.py                       # N = 64 128 256 on the small random model
    python benchmarks/bench_generation.py --sizes 512 1024 4096 --pipeline /path/to/saved/pipeline --device cuda
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


SAMPLERS = ("block", "token", "nocache")


def build_small_pipeline(max_shape_tokens: int, hidden_size: int, layers: int):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import Qwen2VLImageProcessorPil

    from cgmllm import CGMLLMConfig, CGMLLMForConditionalGeneration, CGMLLMProcessor, train_bbpe_tokenizer
    from cgmllm.modeling_shape_vae import ShapeVAE
    from cgmllm.pipelines import CGMLLMPipeline

    tokenizer = train_bbpe_tokenizer(["a red car", "a tall cylinder on a flat box"] * 8, vocab_size=300)
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=1, temporal_patch_size=2)
    processor = CGMLLMProcessor(image_processor=image_processor, tokenizer=tokenizer, num_shape_tokens=max_shape_tokens)
    heads = max(hidden_size // 32, 1)
    config = CGMLLMConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 3,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
            head_dim=32, pad_token_id=0,
            rope_parameters={"rope_type": "default", "mrope_section": [8, 4, 4], "mrope_interleaved": True,
                             "rope_theta": 10000},
        ),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=4, patch_size=16,
                           spatial_merge_size=1, temporal_patch_size=2, out_hidden_size=hidden_size,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        shape_latent_channels=64,
        num_shape_tokens=max_shape_tokens,
        **processor.special_token_ids,
    )
    torch.manual_seed(0)
    model = CGMLLMForConditionalGeneration(config).eval()
    torch.nn.init.normal_(model.llm2obj.weight, std=0.02)  # zero-init head would make every sampler trivial
    vae = ShapeVAE(num_latents=max_shape_tokens, embed_dim=64, width=32, heads=4, num_encoder_layers=1,
                   num_decoder_layers=1, pc_size=256)
    return CGMLLMPipeline(model=model, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                          processor=processor)


@torch.no_grad()
def sample_without_cache(pipe, prompt, num_shape_tokens, steps, guidance_scale, generator):
    """Whole-object sampling that recomputes [context, block] at every step (both CFG branches in one batch)."""
    processor, model, device = pipe.processor, pipe.model, pipe._execution_device
    texts = [processor.text_to_shape_prompt(prompt) + "<shape>", "<shape>"]
    inputs = processor(text=texts, num_shape_tokens=num_shape_tokens, padding_side="left").to(device)
    x = pipe.prepare_latents(1, num_shape_tokens, torch.float32, device, generator)
    pipe.scheduler.set_timesteps(steps, device=device)
    position_ids = None
    for i, t in enumerate(pipe.scheduler.timesteps):
        sigma = float(pipe.scheduler.sigmas[i])
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], position_ids=position_ids,
                    shape_latents=x.repeat(2, 1, 1).reshape(-1, x.shape[-1]),
                    shape_timesteps=torch.full((2 * num_shape_tokens,), sigma, device=device), logits_to_keep=1)
        position_ids = out.position_ids  # the rope ids do not change between steps
        v_cond, v_uncond = out.velocity.view(2, num_shape_tokens, -1).chunk(2)
        v = pipe.apply_guidance(v_cond, v_uncond, guidance_scale, True) if 0.4 < sigma <= 1.0 else v_cond
        x = pipe.scheduler.step(v, t, x, return_dict=False)[0]
    return x


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def worker(args) -> dict:
    """Run one (N, sampler) and return its timing and peak memory."""
    torch.set_num_threads(args.threads)
    if args.pipeline:
        from cgmllm.pipelines import CGMLLMPipeline

        pipe = CGMLLMPipeline.from_pretrained(args.pipeline)
    else:
        pipe = build_small_pipeline(max(args.sizes), args.hidden_size, args.layers)
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    n = args.worker_size

    def run(steps):
        generator = torch.Generator().manual_seed(0)
        if args.worker_sampler == "nocache":
            return sample_without_cache(pipe, args.prompt, n, steps, args.guidance_scale, generator)
        block = n if args.worker_sampler == "block" else 1
        return pipe(args.prompt, num_inference_steps=steps, guidance_scale=args.guidance_scale, num_shape_tokens=n,
                    shape_block_size=block, generator=generator, output_type="latent").latents

    run(1) if args.worker_sampler != "token" else None  # warm-up (token-by-token is long enough on its own)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib("VmRSS") * 1024
    seconds = float("inf")
    for _ in range(args.repeats):  # best of a few runs: shared CPUs are noisy
        start = time.perf_counter()
        latents = run(args.steps)
        if cuda:
            torch.cuda.synchronize()
        seconds = min(seconds, time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024) - base
    return {"seconds": seconds, "peak_mib": max(peak, 0) / 2**20, "finite": bool(torch.isfinite(latents).all())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="latent rows N")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--prompt", default="a tall cylinder on a flat box")
    parser.add_argument("--pipeline", default=None, help="saved CGMLLMPipeline folder (default: small random model)")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (best is reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--worker-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-sampler", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker_size is not None:
        print(json.dumps(worker(args)))
        return

    results = {}
    for n in args.sizes:
        for sampler in args.samplers:
            command = [sys.executable, __file__, *sys.argv[1:], "--worker-size", str(n), "--worker-sampler", sampler]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"worker N={n} {sampler} failed:\n{done.stderr[-3000:]}")
            results[n, sampler] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  N={n:5d} {sampler:8s} {results[n, sampler]['seconds']:8.2f} s", file=sys.stderr)

    model = args.pipeline or f"small random model (hidden {args.hidden_size}, {args.layers} layers)"
    print(f"\n{model}, device {args.device}, {args.steps} steps, CFG {args.guidance_scale} (batched), "
          f"{args.threads} threads, best of {args.repeats}")
    header = f"{'N':>6} | {'sampler':8} | {'time s':>8} | {'peak MiB':>9} | {'time / block':>12} | {'mem / block':>11}"
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        ref = results.get((n, "block"))
        for sampler in args.samplers:
            r = results[n, sampler]
            time_ratio = f"{r['seconds'] / ref['seconds']:.2f}x" if ref else "-"
            mem_ratio = f"{r['peak_mib'] / ref['peak_mib']:.2f}x" if ref and ref["peak_mib"] > 0 else "-"
            print(f"{n:6d} | {sampler:8} | {r['seconds']:8.2f} | {r['peak_mib']:9.1f} | {time_ratio:>12} | "
                  f"{mem_ratio:>11}")


if __name__ == "__main__":
    main()
