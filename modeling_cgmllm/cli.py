"""The `cgmllm` command line.

    cgmllm demo        # a tiny random CG-MLLM learns one text + 3D batch on the CPU, then captions a 3D block
"""

import argparse
import sys
import time


def _tiny_demo_model():
    import torch

    from .configuration_cgmllm import CGMLLMConfig
    from .modeling_cgmllm import CGMLLMForConditionalGeneration

    config = CGMLLMConfig(
        text_config=dict(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, pad_token_id=0,
            rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True,
                             "rope_theta": 10000.0},
        ),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           spatial_merge_size=1, out_hidden_size=64, num_position_embeddings=16,
                           deepstack_visual_indexes=[0]),
        image_token_id=3, video_token_id=4, vision_start_token_id=5, vision_end_token_id=6,
        obj_start_token_id=120, obj_end_token_id=121, obj_pad_token_id=122,
        shape_latent_channels=64, num_shape_tokens=32,
    )
    torch.manual_seed(0)
    return CGMLLMForConditionalGeneration(config)


def run_demo(args) -> int:
    import torch

    model = _tiny_demo_model().train()
    config = model.config
    n = config.num_shape_tokens
    block = [config.obj_start_token_id] + [config.obj_pad_token_id] * n + [config.obj_end_token_id]
    caption = [40, 41, 42, 43, 44]
    # One "text -> 3D" sample and one "3D -> caption" sample.
    input_ids = torch.tensor([[7, 8, 9, 10] + block + [0] * len(caption), block + [7] + caption + [2, 0, 0]])
    attention_mask = (input_ids != 0).long()
    labels = torch.where(input_ids == config.obj_pad_token_id, -100, input_ids).masked_fill(attention_mask == 0, -100)
    labels[1, : n + 3] = -100
    latents = torch.randn(2 * n, config.shape_latent_channels)
    loss_mask = torch.tensor([True] * n + [False] * n)  # the second object is a clean (understanding) block
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    print(f"CG-MLLM demo: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {n} latent rows")
    start = time.perf_counter()
    for step in range(args.steps):
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, shape_latents=latents,
                    shape_loss_mask=loss_mask)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:3d}  lm_loss {out.lm_loss.item():.3f}  flow_loss {out.flow_loss.item():.3f}")
    model.eval()
    prompt = torch.tensor([block + [7]])
    generated = model.generate(input_ids=prompt, shape_latents=latents[n:], max_new_tokens=len(caption) + 1,
                               do_sample=False)
    print(f"caption tokens for the clean 3D block: {generated[0, prompt.shape[1]:].tolist()} (target {caption + [2]})")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cgmllm", description="CG-MLLM: text/image -> 3D mesh and 3D captioning.")
    subcommands = parser.add_subparsers(dest="command", required=True)
    demo = subcommands.add_parser("demo", help="train a tiny random CG-MLLM for a few steps on the CPU")
    demo.add_argument("--steps", type=int, default=60)
    demo.set_defaults(func=run_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
