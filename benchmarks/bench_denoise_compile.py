"""Wall time of CG-MLLM denoising steps, eager vs `torch.compile`d decoder, on a small random model.

A denoising step is one model call on the `<obj_start> + N rows + <obj_end>` block against a prefilled prompt cache
(`update_cache=False`: the rows are written with `cache.update` and cropped off again, so every step has the same
shapes and the compiled decoder is not recompiled). The decoder stack (`model.model.language_model`) is compiled;
the embedding bookkeeping around it stays eager. Both runs start from the same cache and inputs, and the script
checks that they give the same velocity before timing.

    python benchmarks/bench_denoise_compile.py                         # CPU, hidden 256, 4 layers, N = 256
    python benchmarks/bench_denoise_compile.py --device cuda --hidden 2048 --layers 28 --rows 4096 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time

import torch


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
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)

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

    def run(steps):
        with torch.no_grad():
            cache = model(input_ids=prompt, use_cache=True).cache
            velocity = None
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                velocity = model(input_ids=block, cache=cache, update_cache=False, position_ids=rope,
                                 shape_latents=latents, shape_timesteps=timesteps, logits_to_keep=1).velocity
            sync()
            return velocity, (time.perf_counter() - start) / steps

    eager_velocity, _ = run(3)  # warm-up
    eager_velocity, eager_seconds = run(args.steps)
    decoder = model.model.language_model
    model.model.language_model = torch.compile(decoder, dynamic=False)
    start = time.perf_counter()
    # Compiles the prefill, the first step (contiguous prompt cache) and the following ones (the cache after a crop
    # is a strided view): three graphs, then every step reuses the last one.
    compiled_velocity, _ = run(3)
    compile_seconds = time.perf_counter() - start
    compiled_velocity, compiled_seconds = run(args.steps)
    model.model.language_model = decoder
    error = (compiled_velocity.float() - eager_velocity.float()).abs().max().item()
    print(f"denoising step, hidden {args.hidden}, {args.layers} layers, N = {args.rows}, batch {args.batch}, "
          f"prompt {args.prompt}, {args.dtype} on {device}, {torch.get_num_threads()} threads")
    print(f"eager     {eager_seconds * 1000:9.1f} ms / step")
    print(f"compiled  {compiled_seconds * 1000:9.1f} ms / step   (warm-up incl. compilation {compile_seconds:.1f} s)")
    print(f"speed-up  {eager_seconds / compiled_seconds:9.2f}x   max |v_compiled - v_eager| = {error:.2e}")


if __name__ == "__main__":
    main()
