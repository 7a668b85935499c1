"""Quality of a CG-MLLM pipeline on the tiny world's held-out split, printed as one Markdown table.

    python benchmarks/eval_tiny_world.py                                    # the shipped checkpoint
    python benchmarks/eval_tiny_world.py --model runs/tiny-world/pipeline --data runs/tiny-world/data --num 40
    python benchmarks/eval_tiny_world.py --vae runs/vae/vae --num 60               # a ShapeVAE's round trip only
    python benchmarks/eval_tiny_world.py --vae checkpoints/tiny-world/vae --vae-latents 16   # ... with 16 latent rows

Without `--data` the held-out split is rebuilt in memory from its specs (the recipe's default sizes and seed).

Rows (single shapes of the `test` split, in file order; see `cgmllm.training.tiny_world.evaluation`):
* ShapeVAE reconstruction: volume IoU, Chamfer distance and family accuracy of encode -> decode, on all / novel /
  seen rows: the accuracy a generator would reach by reproducing the ground truth's own latents, so the cap of the
  text -> 3D family rows (with `--vae FOLDER`, for that ShapeVAE, e.g. a `train_vae` output, and nothing else;
  `--vae-latents N` encodes with N latent rows instead of the pipeline's largest, the cap at a smaller N);
* text -> 3D from the canonical captions, on all / novel-combination / seen-combination prompts: family accuracy
  (nearest reference family, pose and proportions taken out), proportion and orientation accuracy;
* p-FID / p-KID (Point-E's protocol, `cgmllm.evaluation`) of the text -> 3D and image -> 3D shapes against the
  held-out ground-truth meshes, with the tiny world's PointNet++ (`--pointnet`, default the shipped
  `checkpoints/tiny-world-pointnet`), next to the floor: the same prompts' combinations drawn again with new
  dimensions (a generator right on every prompt), scored the same way (with a few dozen shapes the 512-d FID is
  dominated by its estimation error, and the unbiased KID can be negative);
* mesh -> caption: family-word accuracy, BLEU-1, ROUGE-L and METEOR (`cgmllm.evaluation.caption_metrics`, PointLLM's
  protocol) against the paraphrases;
* posed trimesh primitives -> caption: `--num-primitives` meshes per family built by trimesh's own constructors
  (cylinder, cone, torus, box, sphere, capsule, tube, pyramid; `tiny_world.primitives`), re-tessellated, the first
  as built (axis +Z), the others randomly rotated, scaled and moved: family-word accuracy overall, as built / posed,
  and per family (meshes the tiny world did not make: does captioning hold beyond its own tessellation and poses?);
* image -> caption and image -> 3D on the rendered views of the same held-out objects (the data set's camera);
* block vs token-by-token generation on the same prompts and seeds: wall time ratio and family accuracy of each;
* with `--by-prompt`, a second table: text -> 3D family accuracy per prompt, worst first.
Numbers depend on the machine only through the timings.
"""

import argparse
import time
from pathlib import Path

import torch


def print_table(title: str, table: list[tuple[str, str]], start: float) -> None:
    print(f"\n{title}, {torch.get_num_threads()} threads, {time.perf_counter() - start:.0f} s in all")
    print("| metric | value |\n|---|---|")
    for name, value in table:
        print(f"| {name} | {value} |")


def main(argv=None) -> int:
    from cgmllm import CGMLLMPipeline
    from cgmllm.cli import default_model_dir
    from cgmllm.evaluation import tiny_world_pointnet_path
    from cgmllm.modeling_shape_vae import ShapeVAE
    from cgmllm.training.tiny_world import load_tiny_world
    from cgmllm.training.tiny_world.primitives import posed_primitive_rows
    from cgmllm.training.tiny_world.evaluation import (
        family_accuracy_by_prompt,
        heldout_rows,
        image_to_caption,
        point_cloud_distances,
        primitive_captions,
        redrawn_meshes,
        render_view,
        shape_to_caption,
        single_shape_rows,
        text_to_shape,
        vae_reconstruction,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None, help="saved CGMLLMPipeline folder (default: the shipped tiny world)")
    parser.add_argument("--data", default=None, help="tiny-world data folder (default: rebuild the held-out split)")
    parser.add_argument("--num", type=int, default=40, help="held-out prompts / meshes per measurement")
    parser.add_argument("--num-token", type=int, default=10, help="prompts of the block vs token comparison")
    parser.add_argument("--num-primitives", type=int, default=10,
                        help="posed trimesh primitives per family to caption (8 families; 0 skips these rows)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=[0.4, 1.0], metavar=("LOW", "HIGH"),
                        help="CFG only for LOW < t <= HIGH (the official (0.4, 1]); 0 1 guides every step")
    parser.add_argument("--no-guidance-renorm", dest="guidance_renorm", action="store_false",
                        help="no global renorm of the guided velocity (the official sampler renorms)")
    parser.add_argument("--vae", default=None,
                        help="a ShapeVAE folder (e.g. train_vae's OUT/vae): measure only its round trip")
    parser.add_argument("--vae-latents", type=int, default=None,
                        help="latent rows of the ShapeVAE round trip (default: the pipeline's largest N)")
    parser.add_argument("--pointnet", default=None,
                        help="PointNet++ checkpoint in Point-E's layout for p-FID / p-KID (default: the tiny world's)")
    parser.add_argument("--octree-resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--verbose", action="store_true", help="print every prompt and caption")
    parser.add_argument("--by-prompt", action="store_true",
                        help="also print text -> 3D family accuracy per prompt (all prompts), worst first")
    args = parser.parse_args(argv)
    if args.num_primitives < 0:
        parser.error(f"--num-primitives {args.num_primitives}: give 0 (skip the primitives rows) or more.")
    if args.threads:
        torch.set_num_threads(args.threads)

    model = args.model or default_model_dir()
    if model is None:
        parser.error("no --model given and no shipped tiny-world checkpoint found")
    pipe = CGMLLMPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    if args.vae_latents is not None and not 1 <= args.vae_latents <= pipe.max_shape_tokens:
        parser.error(f"--vae-latents {args.vae_latents}: the round trip takes 1 to {pipe.max_shape_tokens} latent "
                     "rows (the pipeline's largest N).")
    if args.vae:
        # Only the round trip is meaningful: the pipeline's model was trained on its own VAE's latents.
        pipe.vae = ShapeVAE.from_pretrained(args.vae).eval().requires_grad_(False)
    pointnet = args.pointnet or tiny_world_pointnet_path()
    test = load_tiny_world(args.data, "test") if args.data else heldout_rows()
    rows = single_shape_rows(test, args.num)
    novel, seen = single_shape_rows(test, args.num, "novel"), single_shape_rows(test, args.num, "seen")
    generate = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                    guidance_interval=tuple(args.guidance_interval), guidance_renorm=args.guidance_renorm,
                    octree_resolution=args.octree_resolution, seed=args.seed, verbose=args.verbose)
    start = time.perf_counter()

    table = []
    vae = vae_reconstruction(pipe, rows, octree_resolution=args.octree_resolution, num_shape_tokens=args.vae_latents)
    table += [("ShapeVAE latent rows of the round trip", str(args.vae_latents or pipe.max_shape_tokens)),
              (f"ShapeVAE volume IoU ({vae['count']} meshes)", f"{vae['iou']:.3f}"),
              ("ShapeVAE Chamfer distance (cube [-1, 1]^3)", f"{vae['chamfer']:.4f}"),
              ("ShapeVAE round-trip family accuracy, all", f"{vae['family_accuracy']:.0%}")]
    for name, novel_rows in (("novel combinations", True), ("seen combinations", False)):
        hits = [p["predicted"] == p["family"] for p in vae["predictions"] if p["novel_combination"] == novel_rows]
        table.append((f"ShapeVAE round-trip family accuracy, {name} ({len(hits)})",
                      f"{sum(hits) / len(hits):.0%}" if hits else "n/a"))
    if args.vae:
        print_table(f"{args.vae}: octree {args.octree_resolution}", table, start)
        return 0
    for name, subset in (("all", rows), ("novel combinations", novel), ("seen combinations", seen)):
        if args.verbose:
            print(f"text -> 3D, {name}:")
        result = text_to_shape(pipe, subset, **generate)
        if name == "all":
            by_prompt = family_accuracy_by_prompt(result["predictions"])
            text_meshes = result["meshes"]
        table += [(f"text->3D family accuracy, {name} ({result['count']})", f"{result['family_accuracy']:.0%}"),
                  (f"text->3D proportion accuracy, {name}", f"{result['proportion_accuracy']:.0%}"),
                  (f"text->3D orientation accuracy, {name}", f"{result['orientation_accuracy']:.0%}")]
    references = [row["mesh"] for row in rows]
    if pointnet is not None:
        distances = point_cloud_distances(text_meshes, references, pointnet, seed=args.seed)
        floor = point_cloud_distances(redrawn_meshes(rows, args.seed), references, pointnet, seed=args.seed)
        table += [(f"text->3D p-FID / p-KID x100 vs held-out ground truth ({distances['count']} vs "
                   f"{distances['num_references']}, {distances['num_empty']} empty)",
                   f"{distances['p_fid']:.2f} / {100 * distances['p_kid']:.2f}"),
                  (f"same combinations redrawn, p-FID / p-KID x100 vs held-out ground truth ({floor['count']}, the "
                   "floor)",
                   f"{floor['p_fid']:.2f} / {100 * floor['p_kid']:.2f}")]
    if args.verbose:
        print("mesh -> caption:")
    captions = shape_to_caption(pipe, rows, verbose=args.verbose)
    table += [(f"mesh->caption family-word accuracy ({captions['count']})", f"{captions['family_word_accuracy']:.0%}"),
              ("mesh->caption BLEU-1", f"{captions['bleu1']:.1f}"),
              ("mesh->caption ROUGE-L", f"{captions['rouge_l']:.1f}"),
              ("mesh->caption METEOR", f"{captions['meteor']:.1f}")]
    if args.num_primitives:
        if args.verbose:
            print("posed trimesh primitives -> caption:")
        primitives = primitive_captions(pipe, posed_primitive_rows(args.num_primitives, seed=args.seed),
                                        verbose=args.verbose)
        table += [(f"posed trimesh primitives -> caption family-word accuracy ({primitives['count']})",
                   f"{primitives['family_word_accuracy']:.0%}"),
                  ("posed trimesh primitives: as built (axis +Z) / randomly posed",
                   f"{primitives['as_built_accuracy']:.0%} / {primitives['posed_accuracy']:.0%}"),
                  ("posed trimesh primitives: right per family", ", ".join(
                      f"{family} {right}/{total}" for family, (right, total) in primitives["by_family"].items()))]
    views = [dict(row, image=render_view(row)) for row in rows]  # rendered once for both image measurements
    if args.verbose:
        print("image -> caption:")
    captions = image_to_caption(pipe, views, verbose=args.verbose)
    table += [(f"image->caption family-word accuracy ({captions['count']})",
               f"{captions['family_word_accuracy']:.0%}"),
              ("image->caption BLEU-1", f"{captions['bleu1']:.1f}"),
              ("image->caption ROUGE-L", f"{captions['rouge_l']:.1f}"),
              ("image->caption METEOR", f"{captions['meteor']:.1f}")]
    if args.verbose:
        print("image -> 3D:")
    result = text_to_shape(pipe, views, **generate, condition="image")
    table += [(f"image->3D family accuracy ({result['count']})", f"{result['family_accuracy']:.0%}"),
              ("image->3D proportion accuracy", f"{result['proportion_accuracy']:.0%}"),
              ("image->3D orientation accuracy", f"{result['orientation_accuracy']:.0%}")]
    if pointnet is not None:
        distances = point_cloud_distances(result["meshes"], references, pointnet, seed=args.seed)
        table.append((f"image->3D p-FID / p-KID x100 vs held-out ground truth ({distances['count']}, "
                      f"{distances['num_empty']} empty)", f"{distances['p_fid']:.2f} / {100 * distances['p_kid']:.2f}"))

    few = rows[: args.num_token]
    block = text_to_shape(pipe, few, **{**generate, "verbose": False}, batch_size=1)
    token = text_to_shape(pipe, few, **{**generate, "verbose": False}, batch_size=1, shape_block_size=1)
    table += [(f"block (K = N) generation: s per shape / family accuracy ({len(few)})",
               f"{block['seconds'] / len(few):.2f} s / {block['family_accuracy']:.0%}"),
              ("token-by-token (K = 1) generation: s per shape / family accuracy",
               f"{token['seconds'] / len(few):.2f} s / {token['family_accuracy']:.0%}"),
              ("token-by-token / block time ratio", f"{token['seconds'] / max(block['seconds'], 1e-9):.1f}x")]

    low, high = args.guidance_interval
    print_table(f"{Path(model).name}: {args.steps} Euler steps, CFG {args.guidance_scale} for t in ({low:g}, {high:g}]"
                f"{'' if args.guidance_renorm else ' without renorm'}, octree {args.octree_resolution}", table, start)
    if args.by_prompt:
        print("\n| text->3D prompt | family right | generated instead |\n|---|---|---|")
        for group in by_prompt:
            instead = ", ".join(f"{family or 'empty mesh'} x{count}"
                                for family, count in group["instead"].most_common())
            print(f"| {group['caption']} | {group['right']} / {group['total']} | {instead} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
