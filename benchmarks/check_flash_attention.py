"""flash-attn 2 against sdpa on a GPU: the same random bfloat16 model, the same inputs, both kernels.

The CPU tests (`tests/test_flash_attention.py`) check the dispatch and the varlen bookkeeping with a plain-SDPA
stand-in for flash-attn's kernels; this script runs the real kernels (`pip install 'cg-mllm[gpu]'`, a CUDA GPU) on
the forwards that take the flash path:

* a left-padded prefill (varlen, causal) and a decoding step after it (query length 1);
* denoising steps on one block against the padded prompt's cache (varlen, non-causal), DynamicCache and StaticCache;
* a padding-free packed text row (`cu_seqlens`, causal);
* the whole text -> 3D pipeline (CFG batch, blocks, clean blocks written into the cache).

It prints the largest difference per case and exits non-zero when one exceeds bfloat16's tolerance.

    python benchmarks/check_flash_attention.py [--hidden 512 --layers 4 --rows 512]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_denoise_compile import build  # noqa: E402  (the benchmarks' random model of a given width)
from bench_generation import build_small_pipeline  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=512, help="latent rows of the denoised block")
    parser.add_argument("--tolerance", type=float, default=3e-2, help="largest |flash - sdpa| / max |sdpa| allowed")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    from cgmllm.training.devices import parse_device_argument
    from transformers import DataCollatorWithFlattening
    from transformers.cache_utils import DynamicCache, StaticCache
    from transformers.utils import is_flash_attn_2_available

    device, dtype = parse_device_argument(parser, args.device), getattr(torch, args.dtype)
    if not is_flash_attn_2_available():
        raise SystemExit("needs a CUDA GPU and flash-attn (pip install 'cg-mllm[gpu]'): nothing checked")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"flash-attn 2 vs sdpa on {name}, {args.dtype}, hidden {args.hidden}, {args.layers} layers, "
          f"N = {args.rows}")
    with torch.device(device):
        model = build(args.hidden, args.layers, args.rows, dtype, device)
    torch.nn.init.normal_(model.llm2obj.weight, std=0.02)  # the zero-initialised head would hide every difference
    config = model.config
    generator = torch.Generator(device).manual_seed(0)
    prompt = torch.randint(10, 400, (2, 40), device=device, generator=generator)
    prompt[0, :7] = 0  # left padding
    prompt_mask = (prompt != 0).long()
    block = torch.tensor([config.obj_start_token_id] + [config.obj_pad_token_id] * args.rows
                         + [config.obj_end_token_id], device=device).expand(2, -1)
    step_mask = torch.cat([prompt_mask, torch.ones_like(block)], 1)
    rope = torch.full((3, 2, block.shape[1]), 40, device=device)
    latents = torch.randn(2 * args.rows, 64, device=device, generator=generator)
    packed = DataCollatorWithFlattening()([{"input_ids": list(range(20 + i, 60 + 7 * i))} for i in range(3)])
    packed = {k: v.to(device) for k, v in packed.items()}

    def decoding_step():
        cache = DynamicCache(config=config.text_config)
        model(input_ids=prompt, attention_mask=prompt_mask, cache=cache, use_cache=True)
        next_tokens = torch.full((2, 1), 17, device=device)
        return model(input_ids=next_tokens, attention_mask=torch.cat([prompt_mask, prompt_mask[:, -1:]], 1),
                     cache=cache).logits

    def denoising_step(cache):
        model(input_ids=prompt, attention_mask=prompt_mask, cache=cache, use_cache=True)
        return model(input_ids=block, cache=cache, update_cache=False, attention_mask=step_mask, position_ids=rope,
                     shape_latents=latents, shape_timesteps=torch.full((1,), 0.7, device=device)).velocity

    cases = {
        "padded prefill (real positions)": lambda: model(input_ids=prompt, attention_mask=prompt_mask).logits[
            prompt_mask.bool()],
        "decoding step after it": decoding_step,
        "denoising step, DynamicCache": lambda: denoising_step(DynamicCache(config=config.text_config)),
        "denoising step, StaticCache": lambda: denoising_step(
            StaticCache(config=config.text_config, max_cache_len=64 + block.shape[1])),
        "packed text row": lambda: model(**packed).logits,
    }
    with torch.device(device):
        pipe = build_small_pipeline(args.rows, args.hidden, args.layers, head_dim=64)
    pipe.to(device, dtype)
    torch.nn.init.normal_(pipe.model.llm2obj.weight, std=0.02)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, args.rows, 64, device=device, generator=generator)
    cases["pipeline text -> 3D latents"] = lambda: pipe(
        ["a red car", "a tall cylinder on a flat box"], num_inference_steps=8, latents=noise,
        shape_block_size=args.rows // 2, output_type="latent").latents

    failed = []
    for name, call in cases.items():
        results = {}
        for implementation in ("sdpa", "flash_attention_2"):
            for m in (model, pipe.model):
                m.set_attn_implementation({"text_config": implementation, "vision_config": "sdpa"})
            with torch.no_grad():
                results[implementation] = call().float()
        reference = results["sdpa"]
        difference = (results["flash_attention_2"] - reference).abs().max().item()
        relative = difference / max(reference.abs().max().item(), 1e-6)
        ok = relative <= args.tolerance
        failed += [] if ok else [name]
        print(f"{name:36s} max |flash - sdpa| = {difference:.3e}  ({relative:.2e} of max |sdpa|)  "
              f"{'ok' if ok else 'TOO LARGE'}")
    if failed:
        raise SystemExit(f"flash-attn differs from sdpa beyond {args.tolerance}: {failed}")


if __name__ == "__main__":
    main()
