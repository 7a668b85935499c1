"""Wall time of CG-MLLM denoising steps, eager vs `torch.compile`d, on a small random model.

A denoising step is one model call on the `<obj_start> + N rows + <obj_end>` block against a prefilled prompt cache
(`update_cache=False`: the rows are written with `cache.update` and cropped off again, so every step has the same
shapes and nothing is recompiled). Two compiled variants:

* decoder: only the decoder stack (`model.model.language_model`) is compiled; the embedding bookkeeping, the mask
  and the velocity head around it stay eager;
* whole step: the whole model call, with `fullgraph=True` (the step reads nothing on the host, so it is one graph).

All runs start from the same cache and inputs, and the script prints how far each compiled velocity is from eager.

    python benchmarks/bench_denoise_compile.py                         # CPU, hidden 256, 4 layers, N = 256
    python benchmarks/bench_denoise_compile.py --device cuda --hidden 2048 --layers 28 --rows 4096 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch
import torch._dynamo


def build(hidden: int, layers: int, rows: int, dtype, device):
    from cgmllm import CGMLLMConfig, CGMLLMForConditionalGeneration

    heads = max(hidden // 64, 2)
    config = CGMLLMConfig(
        text_config=dict(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1), head_dim=64,
                         pad_token_id=0,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 8, 8],
                                          "mrope_interleaved": True, "rope_theta": 10000}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=4, patch_size=16,
                           spatial_merge_size=1, temporal_patch_size=2, out_hidden_size=hidden,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        image_token_id=3, video_token_id=4, vision_start_token_id=5, vision_end_token_id=6,
        obj_start_token_id=500, obj_end_token_id=501, obj_pad_token_id=502, num_shape_tokens=rows,
        shape_latent_channels=64,
    )
    torch.manual_seed(0)
    return CGMLLMForConditionalGeneration(config).to(device=device, dtype=dtype).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2, help="rows of the batch (2 = one object with CFG)")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the best is reported)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from cgmllm.training.devices import parse_device_argument

    dtype, device = getattr(torch, args.dtype), parse_device_argument(parser, args.device)

    model = build(args.hidden, args.layers, args.rows, dtype, device)
    config = model.config
    prompt = torch.randint(10, 400, (args.batch, args.prompt), device=device)
    block = torch.tensor([config.obj_start_token_id] + [config.obj_pad_token_id] * args.rows
                         + [config.obj_end_token_id], device=device).expand(args.batch, -1)
    rope = torch.full((3, args.batch, block.shape[1]), args.prompt, device=device)
    latents = torch.randn(args.batch * args.rows, 64, device=device)
    timesteps = torch.full((args.batch * args.rows,), 0.5, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(cache):
        return model(input_ids=block, cache=cache, update_cache=False, position_ids=rope, shape_latents=latents,
                     shape_timesteps=timesteps, logits_to_keep=1).velocity

    def run(steps, step_fn):
        with torch.no_grad():
            cache = model(input_ids=prompt, use_cache=True).cache
            velocity = None
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                velocity = step_fn(cache)
            sync()
            return velocity, (time.perf_counter() - start) / steps

    def warm_up(step_fn):
        # Compiles the first step (contiguous prompt cache) and the following ones (the cache after a crop is a strided
        # view), then every step reuses the last graph. The prefill is never compiled: it runs eagerly in every variant.
        start = time.perf_counter()
        run(3, step_fn)
        return time.perf_counter() - start

    decoder = model.model.language_model
    compiled_decoder = torch.compile(decoder, dynamic=False)

    def with_decoder(module, step_fn):
        def run_step(cache):
            model.model.language_model = module
            try:
                return step_fn(cache)
            finally:
                model.model.language_model = decoder
        return run_step

    variants = {
        "eager": step,
        "compiled decoder": with_decoder(compiled_decoder, step),
        "compiled whole step": torch.compile(step, fullgraph=True, dynamic=False),
    }
    compile_seconds = {name: warm_up(step_fn) for name, step_fn in variants.items()}
    # Interleaved rounds, best of each: on a shared machine the load changes between runs, so timing the variants one
    # after the other would measure the load as much as the compiler.
    seconds = dict.fromkeys(variants, float("inf"))
    velocities = {}
    for _ in range(args.rounds):
        for name, step_fn in variants.items():
            velocities[name], elapsed = run(args.steps, step_fn)
            seconds[name] = min(seconds[name], elapsed)

    print(f"denoising step, hidden {args.hidden}, {args.layers} layers, N = {args.rows}, batch {args.batch}, "
          f"prompt {args.prompt}, {args.dtype} on {device}, {torch.get_num_threads()} threads, best of "
          f"{args.rounds} interleaved rounds of {args.steps} steps")
    for name in variants:
        error = (velocities[name].float() - velocities["eager"].float()).abs().max().item()
        print(f"{name:<20} {seconds[name] * 1000:9.1f} ms / step   speed-up {seconds['eager'] / seconds[name]:5.2f}x"
              f"   max |v - v_eager| = {error:.2e}   (warm-up incl. compilation {compile_seconds[name]:.1f} s)")


if __name__ == "__main__":
    main()
