"""Text -> 3D and mesh -> caption quality of a CG-MLLM pipeline on the tiny world's held-out split.

    python benchmarks/eval_tiny_world.py --model runs/tiny-world/pipeline --data runs/tiny-world/data --num 20

For each held-out sample (in file order, the first `--num`):
* text -> 3D: generate from the canonical caption; the predicted family is the family whose ground-truth meshes
  with the same attributes are nearest by Chamfer distance (families for which the attributes do not exist are
  skipped); proportion accuracy compares `classify_proportion` of the generated mesh with the prompt's attribute;
* mesh -> caption: caption the ground-truth mesh; family-word accuracy checks that the caption names the family.
Prints one table. Part of issue 6; VAE IoU / Chamfer, image captioning, BLEU-1 / ROUGE-L are still to be added.
"""

import argparse
import time

import numpy as np
import torch
import trimesh


def chamfer(a: trimesh.Trimesh, b: trimesh.Trimesh, num_points: int = 2048, seed: int = 0) -> float:
    """Symmetric mean nearest-neighbour distance between surface samples of two meshes (both normalised)."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    pa = trimesh.sample.sample_surface(a, num_points, seed=int(rng.integers(1 << 31)))[0]
    pb = trimesh.sample.sample_surface(b, num_points, seed=int(rng.integers(1 << 31)))[0]
    return float(cKDTree(pb).query(pa)[0].mean() + cKDTree(pa).query(pb)[0].mean())


def nearest_family(mesh, attributes: dict, families, reference_meshes_for) -> str:
    best, best_distance = None, float("inf")
    for family in families:
        try:
            references = reference_meshes_for(family, attributes, num_variants=2)
        except ValueError:  # the attributes do not exist for this family (e.g. thickness of a box)
            continue
        distance = min(chamfer(mesh, reference) for reference in references)
        if distance < best_distance:
            best, best_distance = family, distance
    return best


def main(argv=None) -> int:
    from cgmllm import CGMLLMPipeline, normalize_mesh
    from cgmllm.training.tiny_world import FAMILIES, classify_proportion, load_tiny_world, reference_meshes_for

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="saved CGMLLMPipeline folder")
    parser.add_argument("--data", required=True, help="tiny-world data folder")
    parser.add_argument("--num", type=int, default=20)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--octree-resolution", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subset", choices=("all", "novel", "seen"), default="all",
                        help="held-out samples of unseen attribute combinations, of seen ones, or both")
    args = parser.parse_args(argv)

    pipe = CGMLLMPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    dataset = load_tiny_world(args.data, "test")
    wanted = {"all": (True, False), "novel": (True,), "seen": (False,)}[args.subset]
    single = [row for row in dataset if row["family"] in FAMILIES and bool(row["novel_combination"]) in wanted]
    single = single[: args.num]
    families = list(FAMILIES)

    family_hits = proportion_hits = proportion_total = caption_hits = 0
    start = time.perf_counter()
    for index, row in enumerate(single):
        attributes = {k: row[k] for k in ("proportion", "thickness", "orientation") if row.get(k) is not None}
        out = pipe(row["caption"], num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                   octree_resolution=args.octree_resolution,
                   generator=torch.Generator().manual_seed(args.seed + index))
        mesh = normalize_mesh(out.mesh)[0]
        predicted = nearest_family(mesh, attributes, families, reference_meshes_for)
        family_hits += predicted == row["family"]
        if "proportion" in attributes:
            proportion_total += 1
            proportion_hits += classify_proportion(mesh) == attributes["proportion"]
        caption = pipe.caption(mesh=row["mesh"], max_new_tokens=24)[0]
        caption_hits += row["family"] in caption
        print(f"{index:3d} {row['caption']!r:45} -> {predicted:10} | caption {caption!r}")
    n = len(single)
    print(f"\n{n} held-out prompts ({args.subset}), {args.steps} steps, CFG {args.guidance_scale}, {time.perf_counter() - start:.0f}s")
    print("| metric | value |\n|---|---|")
    print(f"| text->3D family accuracy (nearest reference family) | {family_hits / n:.0%} |")
    if proportion_total:
        print(f"| text->3D proportion accuracy | {proportion_hits / proportion_total:.0%} ({proportion_total}) |")
    print(f"| mesh->caption family-word accuracy | {caption_hits / n:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
