"""Wall time and peak memory of CG-MLLM shape generation: whole-object block vs token-by-token vs no KV cache.

Four samplers of the same flow (S Euler steps, CFG, same prompt):

* ``block``     whole object in one block (K = N): prefill once, S passes of N + 2 rows against the read-only
                cache, both CFG branches in one batch (the conditional rows alone outside the guidance interval);
* ``token``     token by token (K = 1): N sequential blocks of one row, S passes each, plus one cache write per row;
* ``nocache``   whole object, but every step recomputes the full sequence [prompt, block] (no KV cache), both
                branches in one batch;
* ``official``  the official sampler's structure without its cache: every step runs the conditional sequence
                [prompt, block] and the unconditional one [block] as two separate passes (the unconditional pass
                only inside the guidance interval).

The condition is the text prompt, or with ``--image-tokens T ...`` also a random image of T image tokens per case
(image -> 3D): long contexts are where the KV cache pays, since a step without it recomputes the whole prompt
(vision tower included). The table prints every sampler's time as a ratio to ``block`` in the same run.

Every (N, sampler) runs in a fresh worker process so that peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated``; on CPU the growth of the process' peak resident set (``VmHWM``) over its
resident set just before sampling. Without ``--pipeline`` a small random model is built (fixed seed), which
measures the sampler structure, not the 2B model.

    python benchmarks/bench_generation.py                       # N = 64 128 256 on the small random model
    python benchmarks/bench_generation.py --sizes 256 --image-tokens 256 1024   # + image prompts
    python benchmarks/bench_generation.py --sizes 512 1024 4096 --pipeline /path/to/saved/pipeline --device cuda
    python benchmarks/bench_generation.py --sizes 512 4096 --samplers block --device cuda --dtype bfloat16 \
        --hidden-size 2048 --layers 28 --heads 16 --kv-heads 8 --head-dim 128 --intermediate-size 6144 \
        --attn-implementation flash_attention_2          # a random model of Qwen3-VL-2B's text shape
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


SAMPLERS = ("block", "token", "nocache", "official")
GUIDANCE_INTERVAL = (0.4, 1.0)  # the pipeline's default, used by the uncached samplers too


def build_small_pipeline(max_shape_tokens: int, hidden_size: int, layers: int, heads: int | None = None,
                         kv_heads: int | None = None, head_dim: int = 32, intermediate_size: int | None = None):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import Qwen2VLImageProcessorPil

    from cgmllm import CGMLLMConfig, CGMLLMForConditionalGeneration, CGMLLMProcessor, train_bbpe_tokenizer
    from cgmllm.modeling_shape_vae import ShapeVAE
    from cgmllm.pipelines import CGMLLMPipeline

    tokenizer = train_bbpe_tokenizer(["a red car", "a tall cylinder on a flat box"] * 8, vocab_size=300)
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=1, temporal_patch_size=2)
    processor = CGMLLMProcessor(image_processor=image_processor, tokenizer=tokenizer, num_shape_tokens=max_shape_tokens)
    heads = heads or max(hidden_size // head_dim, 1)
    half = head_dim // 2  # interleaved mRoPE sections (t, h, w) over half the head dim: [8, 4, 4] at head dim 32
    mrope_section = [half // 2, half // 4, half - half // 2 - half // 4]
    config = CGMLLMConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size or hidden_size * 3,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or max(heads // 2, 1),
            head_dim=head_dim, pad_token_id=0,
            rope_parameters={"rope_type": "default", "mrope_section": mrope_section, "mrope_interleaved": True,
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


def random_image(num_image_tokens: int, pipe):
    """A random RGB image whose processed grid gives `num_image_tokens` tokens (a square of patches)."""
    import numpy as np
    from PIL import Image

    side = int(round(num_image_tokens**0.5))
    if side * side != num_image_tokens:
        raise SystemExit(f"--image-tokens {num_image_tokens}: use a square number (256, 1024, ...).")
    image_processor = pipe.processor.image_processor
    pixels = side * image_processor.patch_size * image_processor.merge_size
    array = np.random.default_rng(0).integers(0, 256, (pixels, pixels, 3), dtype=np.uint8)
    return Image.fromarray(array)


@torch.no_grad()
def sample_without_cache(pipe, condition, num_shape_tokens, steps, guidance_scale, generator, separate=False):
    """Whole-object sampling that recomputes [context, block] at every step: both CFG branches in one batch, or
    (`separate=True`, the official structure) one pass per branch."""
    processor, model, device = pipe.processor, pipe.model, pipe._execution_device
    image = condition.get("image")
    cond_text = (processor.image_to_shape_prompt() if image is not None
                 else processor.text_to_shape_prompt(condition["prompt"])) + "<shape>"
    images = [image] if image is not None else None

    def encode(texts, with_images):
        return processor(text=texts, images=images if with_images else None, num_shape_tokens=num_shape_tokens,
                         padding_side="left").to(device)

    if separate:
        branches = [encode([cond_text], True), encode(["<shape>"], False)]
    else:
        branches = [encode([cond_text, "<shape>"], True)]
    x = pipe.prepare_latents(1, num_shape_tokens, torch.float32, device, generator)
    pipe.scheduler.set_timesteps(steps, device=device)
    position_ids = [None] * len(branches)
    for i, t in enumerate(pipe.scheduler.timesteps):
        sigma = float(pipe.scheduler.sigmas[i])
        guided = GUIDANCE_INTERVAL[0] < sigma <= GUIDANCE_INTERVAL[1]
        velocities = []
        for b, inputs in enumerate(branches):
            if separate and b == 1 and not guided:
                continue
            rows = inputs["input_ids"].shape[0]
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                        position_ids=position_ids[b], shape_latents=x.repeat(rows, 1, 1).reshape(-1, x.shape[-1]),
                        shape_timesteps=torch.full((1,), sigma, device=device), logits_to_keep=1)
            position_ids[b] = out.position_ids  # the rope ids do not change between steps
            velocities.append(out.velocity.view(rows, num_shape_tokens, -1))
        velocity = torch.cat(velocities)
        v_cond = velocity[:1]
        v = pipe.apply_guidance(v_cond, velocity[1:2], guidance_scale, True) if guided else v_cond
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
        # Built on the target device: a 2B-shaped random model initialises in seconds on a GPU.
        with torch.device(args.device):
            pipe = build_small_pipeline(max(args.sizes), args.hidden_size, args.layers, args.heads, args.kv_heads,
                                        args.head_dim, args.intermediate_size)
    pipe.to(args.device, getattr(torch, args.dtype))
    if args.attn_implementation:
        pipe.model.set_attn_implementation({"text_config": args.attn_implementation, "vision_config": "sdpa"})
    pipe.set_progress_bar_config(disable=True)
    n = args.worker_size
    tokens = args.worker_image_tokens
    condition = {"prompt": args.prompt} if not tokens else {"image": random_image(tokens, pipe)}

    def run(steps):
        generator = torch.Generator().manual_seed(0)
        if args.worker_sampler in ("nocache", "official"):
            return sample_without_cache(pipe, condition, n, steps, args.guidance_scale, generator,
                                        separate=args.worker_sampler == "official")
        block = n if args.worker_sampler == "block" else 1
        return pipe(**condition, num_inference_steps=steps, guidance_scale=args.guidance_scale, num_shape_tokens=n,
                    shape_block_size=block, generator=generator, output_type="latent",
                    guidance_interval=GUIDANCE_INTERVAL).latents

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
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default: hidden size / head dim)")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: heads / 2)")
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--intermediate-size", type=int, default=None, help="MLP width (default: 3 x hidden size)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn-implementation", default=None,
                        choices=["sdpa", "eager", "flex_attention", "flash_attention_2"],
                        help="the text decoder's attention kernel (default: the model's, sdpa)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (best is reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--image-tokens", type=int, nargs="*", default=[],
                        help="also measure image prompts of these many image tokens (square numbers, e.g. 256 1024)")
    parser.add_argument("--no-text", action="store_true", help="skip the text-prompt case")
    parser.add_argument("--worker-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-sampler", help=argparse.SUPPRESS)
    parser.add_argument("--worker-image-tokens", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from cgmllm.training.devices import parse_device_argument

    parse_device_argument(parser, args.device)  # a missing GPU is a usage error here, not a failed worker
    if args.worker_size is not None:
        print(json.dumps(worker(args)))
        return

    contexts = ([] if args.no_text else [0]) + list(args.image_tokens)  # 0 = the text prompt
    results = {}
    for context in contexts:
        for n in args.sizes:
            for sampler in args.samplers:
                command = [sys.executable, __file__, *sys.argv[1:], "--worker-size", str(n), "--worker-sampler",
                           sampler, "--worker-image-tokens", str(context)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"worker N={n} {sampler} context {context} failed:\n{done.stderr[-3000:]}")
                results[context, n, sampler] = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"  context {context:5d} N={n:5d} {sampler:8s} "
                      f"{results[context, n, sampler]['seconds']:8.2f} s", file=sys.stderr)

    model = args.pipeline or f"random model (hidden {args.hidden_size}, {args.layers} layers)"
    device = args.device
    if device.startswith("cuda"):
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    print(f"\n{model}, {args.dtype}, attention {args.attn_implementation or 'default'}, device {device}, "
          f"{args.steps} steps, CFG {args.guidance_scale} in {GUIDANCE_INTERVAL}, {args.threads} threads, best of "
          f"{args.repeats}")
    header = (f"{'context':>14} | {'N':>5} | {'sampler':8} | {'time s':>8} | {'peak MiB':>9} | {'time / block':>12} | "
              f"{'mem / block':>11}")
    print(header)
    print("-" * len(header))
    for context in contexts:
        label = "text prompt" if context == 0 else f"image {context} tok"
        for n in args.sizes:
            ref = results.get((context, n, "block"))
            for sampler in args.samplers:
                r = results[context, n, sampler]
                time_ratio = f"{r['seconds'] / ref['seconds']:.2f}x" if ref else "-"
                mem_ratio = f"{r['peak_mib'] / ref['peak_mib']:.2f}x" if ref and ref["peak_mib"] > 0 else "-"
                print(f"{label:>14} | {n:5d} | {sampler:8} | {r['seconds']:8.2f} | {r['peak_mib']:9.1f} | "
                      f"{time_ratio:>12} | {mem_ratio:>11}")


if __name__ == "__main__":
    main()
