"""Quality of a CG-MLLM pipeline on the tiny world: the measurements behind `benchmarks/eval_tiny_world.py`.

Each function takes a `CGMLLMPipeline` and held-out rows of `load_tiny_world(..., "test")` and returns plain
numbers, so the benchmark prints them as a table and the test suite checks a floor on the shipped checkpoint.

* `vae_reconstruction`   ShapeVAE round trip of ground-truth meshes: volume IoU, Chamfer distance and the family
                         accuracy of the decoded meshes (a practical cap on text -> 3D family accuracy: every
                         generated shape goes through the same decoder);
* `text_to_shape`        generate from the captions; family accuracy (`classify_family`), proportion and
                         orientation accuracy (`classify_proportion` / `classify_orientation` against the same
                         classifiers on the ground-truth mesh);
* `shape_to_caption`     caption the ground-truth meshes; family-word accuracy and the caption metrics of
                         `cgmllm.evaluation.caption_metrics` (PointLLM's protocol: BLEU-1..4, ROUGE-L, METEOR, x100)
                         against the sample's paraphrases as references;
* `image_to_caption`     the same for the rendered views (the data set's `image` column);
* `primitive_captions`   caption trimesh primitives in any pose and tessellation (`primitives.posed_primitive_rows`:
                         meshes the tiny world did not make); family-word accuracy, per family and as built vs posed;
* `text_to_shape(..., condition="image")`  image -> 3D from the rendered views, scored as text -> 3D;
* `family_accuracy_by_prompt`  text -> 3D family accuracy per prompt, worst first (which combinations fail);
* `point_cloud_distances`  p-FID / p-KID (`cgmllm.evaluation.compute_pfid_pkid`) of generated meshes against the
                         held-out ground truth, with the tiny world's PointNet++ (`pointnet.py`).
"""

import json
import time
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
import trimesh

from ...evaluation import caption_metrics, compute_pfid_pkid, sample_point_clouds
from ...mesh_utils import normalize_mesh, occupancy
from ...rendering import render_mesh
from . import (
    DATASET_VIEW,
    ShapeSpec,
    FAMILIES,
    classify_family,
    classify_orientation,
    classify_proportion,
    make_tiny_world_specs,
    split_combinations,
)


def heldout_rows(num_train: int = 2000, num_heldout: int = 200, seed: int = 0) -> list[dict]:
    """The held-out (`test`) split as `load_tiny_world` rows, rebuilt from the specs without writing files.

    Same specs (and so the same meshes and captions) as `build_tiny_world_dataset` with the same arguments; the
    rows carry `caption`, `captions` (every paraphrase), `family`, the attributes, `novel_combination`, `spec` (JSON,
    as the data set's column) and the ground-truth `mesh`; `render_view(row)` gives the `image` the data set would
    hold.
    """
    novel = {spec.combination for spec in split_combinations(seed).novel}
    rows = []
    for spec in make_tiny_world_specs(num_train, num_heldout, seed)["test"]:
        row = {"caption": spec.caption(), "captions": spec.captions(), "family": spec.family,
               "novel_combination": spec.combination in novel, "spec": json.dumps(spec.to_dict()),
               "mesh": spec.to_mesh()}
        row.update({name: spec.attributes.get(name) for name in ("proportion", "thickness", "orientation")})
        rows.append(row)
    return rows


def render_view(row: dict, image_size: int = 128):
    """The row's `image` (a data set built with images has it), else its mesh rendered as the data set renders it
    (`DATASET_VIEW`, `image_size` pixels; the recipe's data set uses the default 128)."""
    if row.get("image") is not None:
        return row["image"]
    return render_mesh(row["mesh"], image_size, **DATASET_VIEW)


def single_shape_rows(dataset, num: int | None = None, subset: str = "all") -> list[dict]:
    """The first `num` single-shape rows (compositions have no family to classify) of a tiny-world split;
    `subset` keeps the novel attribute combinations (`"novel"`), the seen ones (`"seen"`) or both (`"all"`,
    alternating novel and seen rows so that any `num` is a balanced mix: the split lists the novel ones first)."""
    if subset not in ("all", "novel", "seen"):
        raise ValueError(f"subset must be 'all', 'novel' or 'seen', got {subset!r}.")
    singles = [row for row in dataset if row["family"] in FAMILIES]
    novel = [row for row in singles if row["novel_combination"]]
    seen = [row for row in singles if not row["novel_combination"]]
    if subset == "all":
        rows = [row for pair in zip(novel, seen) for row in pair]
        shorter = min(len(novel), len(seen))
        rows += novel[shorter:] + seen[shorter:]
    else:
        rows = novel if subset == "novel" else seen
    return rows[:num] if num else rows


def row_attributes(row: dict) -> dict[str, str]:
    return {name: row[name] for name in ("proportion", "thickness", "orientation") if row.get(name) is not None}


def _chamfer(a: trimesh.Trimesh, b: trimesh.Trimesh, num_points: int = 4096, seed: int = 0) -> float:
    """Symmetric mean nearest-neighbour distance between surface samples, in the shared normalised frame."""
    from scipy.spatial import cKDTree

    pa = trimesh.sample.sample_surface(a, num_points, seed=seed)[0]
    pb = trimesh.sample.sample_surface(b, num_points, seed=seed + 1)[0]
    return float(cKDTree(pb).query(pa)[0].mean() + cKDTree(pa).query(pb)[0].mean())


@torch.no_grad()
def vae_reconstruction(pipe, rows: Sequence[dict], octree_resolution: int = 64, num_queries: int = 20000,
                       seed: int = 0, num_shape_tokens: int | None = None) -> dict[str, float]:
    """Encode every ground-truth mesh (`pipe.encode_mesh`, the posterior mean, with `num_shape_tokens` latent rows:
    default the pipeline's largest) and decode it again.

    Returns the mean volume IoU (occupancy of `num_queries` uniform points in the VAE cube, ground truth by
    winding number vs. decoded field > 0), the mean Chamfer distance between the decoded and the ground-truth
    surface, both meshes normalised to the VAE cube `[-1, 1]^3` as the processor does, and `family_accuracy`: the
    share of decoded meshes that `classify_family` still assigns to their family, with the per-row `predictions`
    (as `text_to_shape` returns them, plus `novel_combination`), so that the cap can be read per subset.
    """
    rng = np.random.default_rng(seed)
    ious, chamfers, family_hits, predictions = [], [], 0, []
    for row in rows:
        truth = normalize_mesh(row["mesh"])[0]
        latents = pipe.encode_mesh(row["mesh"], num_shape_tokens=num_shape_tokens)
        points = rng.uniform(-1.0, 1.0, size=(num_queries, 3)).astype(np.float32)
        features = pipe.vae.decode(latents.to(pipe.vae.device, pipe.vae.dtype))
        predicted = pipe.vae.query(features, torch.from_numpy(points)[None].to(features))[0].float().cpu().numpy() > 0
        inside = occupancy(truth, points) > 0.5
        union = (predicted | inside).sum()
        ious.append(float((predicted & inside).sum() / union) if union else 1.0)
        decoded = pipe.vae.latents_to_mesh(latents, octree_resolution=octree_resolution)[0]
        chamfers.append(_chamfer(decoded, truth) if len(decoded.faces) else float("nan"))
        family = classify_family(decoded, row_attributes(row)) if len(decoded.faces) else None
        family_hits += family == row["family"]
        predictions.append({"caption": row["caption"], "family": row["family"], "predicted": family,
                            "novel_combination": bool(row.get("novel_combination"))})
    return {"iou": float(np.mean(ious)), "chamfer": float(np.nanmean(chamfers)),
            "family_accuracy": family_hits / max(len(rows), 1), "count": len(rows), "predictions": predictions}


@torch.no_grad()
def text_to_shape(pipe, rows: Sequence[dict], num_inference_steps: int = 25, guidance_scale: float = 4.0,
                  octree_resolution: int = 64, seed: int = 0, batch_size: int = 10, shape_block_size=None,
                  verbose: bool = False, condition: str = "text",
                  guidance_interval: tuple[float, float] | None = (0.4, 1.0), guidance_renorm: bool = True) -> dict:
    """Generate one shape per row from its canonical caption (`condition="text"`) or its rendered view
    (`condition="image"`, `render_view`), row `i` with generator seed `seed + i`, and score it. The sampling
    arguments go to the pipeline as they are (`guidance_interval=None`: CFG at every step).

    Returns `family_accuracy`, `proportion_accuracy` and `orientation_accuracy` (each over the rows where the
    ground-truth mesh has that property), the per-row `predictions` and generated `meshes` (None where empty), and
    `seconds` spent generating.
    """
    if condition not in ("text", "image"):
        raise ValueError(f"condition must be 'text' or 'image', got {condition!r}.")
    predictions, meshes, family_hits = [], [], 0
    proportion = [0, 0]
    orientation = [0, 0]
    seconds = 0.0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
        tick = time.perf_counter()
        inputs = ({"prompt": [row["caption"] for row in batch]} if condition == "text"
                  else {"image": [render_view(row) for row in batch]})
        output = pipe(**inputs, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, octree_resolution=octree_resolution, generator=generators,
                      shape_block_size=shape_block_size, guidance_interval=guidance_interval,
                      guidance_renorm=guidance_renorm)
        seconds += time.perf_counter() - tick
        for row, mesh in zip(batch, output.meshes):
            truth = row["mesh"]
            empty = mesh is None or len(mesh.faces) == 0
            family = None if empty else classify_family(mesh, row_attributes(row))
            family_hits += family == row["family"]
            if row.get("proportion") is not None:
                proportion[1] += 1
                proportion[0] += not empty and classify_proportion(mesh) == row["proportion"]
            expected_pose = classify_orientation(truth)
            if expected_pose is not None:
                orientation[1] += 1
                orientation[0] += not empty and classify_orientation(mesh) == expected_pose
            predictions.append({"caption": row["caption"], "family": row["family"], "predicted": family})
            meshes.append(None if empty else mesh)
            if verbose:
                print(f"  {row['caption']!r:48} -> {family}", flush=True)
    return {
        "family_accuracy": family_hits / max(len(rows), 1),
        "proportion_accuracy": proportion[0] / proportion[1] if proportion[1] else float("nan"),
        "orientation_accuracy": orientation[0] / orientation[1] if orientation[1] else float("nan"),
        "count": len(rows),
        "seconds": seconds,
        "predictions": predictions,
        "meshes": meshes,
    }


def family_accuracy_by_prompt(predictions: Sequence[dict]) -> list[dict]:
    """Family accuracy per prompt from `text_to_shape(...)["predictions"]`, worst first: where generation fails.

    Returns one `{"caption", "family", "right", "total", "instead"}` per distinct caption, `instead` counting the
    families classified in place of the prompted one (`None` for an empty mesh), sorted by accuracy, then caption.
    """
    groups: dict[str, dict] = {}
    for prediction in predictions:
        group = groups.setdefault(prediction["caption"], {"caption": prediction["caption"],
                                                          "family": prediction["family"], "right": 0, "total": 0,
                                                          "instead": Counter()})
        group["total"] += 1
        if prediction["predicted"] == prediction["family"]:
            group["right"] += 1
        else:
            group["instead"][prediction["predicted"]] += 1
    return sorted(groups.values(), key=lambda group: (group["right"] / group["total"], group["caption"]))


def names_family(caption: str, family: str) -> bool:
    """Whether a caption names the family with one of its nouns ("a cube" names a box)."""
    words = f" {caption.lower()} "
    return any(f" {noun} " in words or f" {noun}," in words for noun in FAMILIES[family].all_nouns())


@torch.no_grad()
def shape_to_caption(pipe, rows: Sequence[dict], max_new_tokens: int = 24, batch_size: int = 10,
                     verbose: bool = False, condition: str = "mesh") -> dict:
    """Caption the ground-truth meshes (or, `condition="image"`, their rendered views); family-word accuracy and
    the mean caption metrics (x100) against every paraphrase of the row: `bleu1`, `rouge_l`, `meteor` and the full
    `caption_metrics` scores under `scores`."""
    captions = _caption_rows(pipe, rows, condition, max_new_tokens, batch_size, verbose)
    hits = sum(names_family(caption, row["family"]) for caption, row in zip(captions, rows))
    scores = caption_metrics(captions, [row["captions"] or [row["caption"]] for row in rows])["scores"]
    return {"family_word_accuracy": hits / max(len(rows), 1), "bleu1": scores["bleu_1"],
            "rouge_l": scores["rouge_l"], "meteor": scores["meteor"], "scores": scores, "count": len(rows),
            "captions": captions}


def _caption_rows(pipe, rows: Sequence[dict], condition: str, max_new_tokens: int, batch_size: int,
                  verbose: bool) -> list[str]:
    """The pipeline's caption of every row's `mesh` (`condition="mesh"`) or rendered view (`"image"`)."""
    if condition not in ("mesh", "image"):
        raise ValueError(f"condition must be 'mesh' or 'image', got {condition!r}.")
    captions = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        inputs = ({"mesh": [row["mesh"] for row in batch]} if condition == "mesh"
                  else {"image": [render_view(row) for row in batch]})
        for row, caption in zip(batch, pipe.caption(**inputs, max_new_tokens=max_new_tokens)):
            captions.append(caption)
            if verbose:
                print(f"  {row['caption']!r:48} <- {caption!r}", flush=True)
    return captions


@torch.no_grad()
def primitive_captions(pipe, rows: Sequence[dict], max_new_tokens: int = 24, batch_size: int = 10,
                       verbose: bool = False) -> dict:
    """Caption meshes that the tiny world did not make (`primitives.posed_primitive_rows`: trimesh primitives in any
    pose and tessellation) and score the family words (`names_family`): `family_word_accuracy` over all rows,
    `by_family` (`{family: (right, total)}`, in row order), `as_built_accuracy` over the rows left as trimesh builds
    them (`posed` false) and `posed_accuracy` over the others, with the `captions`. There are no reference
    captions to compute BLEU against: a trimesh call is not a description."""
    captions = _caption_rows(pipe, rows, "mesh", max_new_tokens, batch_size, verbose)
    hits = [names_family(caption, row["family"]) for caption, row in zip(captions, rows)]
    by_family: dict[str, tuple[int, int]] = {}
    for row, hit in zip(rows, hits):
        right, total = by_family.get(row["family"], (0, 0))
        by_family[row["family"]] = (right + hit, total + 1)
    as_built = [hit for row, hit in zip(rows, hits) if not row["posed"]]
    posed = [hit for row, hit in zip(rows, hits) if row["posed"]]
    return {"family_word_accuracy": sum(hits) / max(len(rows), 1), "by_family": by_family,
            "as_built_accuracy": sum(as_built) / len(as_built) if as_built else float("nan"),
            "posed_accuracy": sum(posed) / len(posed) if posed else float("nan"),
            "count": len(rows), "captions": captions}


def image_to_caption(pipe, rows: Sequence[dict], **kwargs) -> dict:
    """`shape_to_caption` on the rendered views (`render_view`) instead of the meshes."""
    return shape_to_caption(pipe, rows, condition="image", **kwargs)


def point_cloud_distances(generated: Sequence, references: Sequence, checkpoint_path, num_points: int = 4096,
                          seed: int = 0) -> dict:
    """p-FID / p-KID of generated meshes against reference meshes (`compute_pfid_pkid`, Point-E's protocol; 4096
    surface points per mesh, sampling seed `seed`). Empty generations (None) are left out and counted in
    `num_empty`. p-KID takes one subset the size of the smaller set (with equal sets: the whole of both)."""
    kept = [mesh for mesh in generated if mesh is not None]
    if len(kept) < 2 or len(references) < 2:
        raise ValueError(f"p-FID needs at least 2 meshes per set; got {len(kept)} generated (of {len(generated)}) "
                         f"and {len(references)} references.")
    clouds_a = sample_point_clouds(kept, num_points, seed)
    clouds_b = sample_point_clouds(list(references), num_points, seed)
    result = compute_pfid_pkid(checkpoint_path, clouds_a, clouds_b, kid_subsets=1,
                               kid_subset_size=min(len(clouds_a), len(clouds_b)), seed=seed)
    return {"p_fid": result["p_fid"], "p_kid": result["p_kid"], "count": len(kept), "num_references": len(references),
            "num_empty": len(generated) - len(kept)}


def redrawn_meshes(rows: Sequence[dict], seed: int = 0) -> list[trimesh.Trimesh]:
    """Each row's combination drawn again with new continuous dimensions (`ShapeSpec.sample`): what a generator that
    gets every prompt exactly right would produce. Its p-FID against the rows' meshes is the floor of the metric for
    that many shapes (a 512-d covariance from a few dozen shapes is far from exact)."""
    rng = np.random.default_rng([seed, 7])
    return [ShapeSpec.from_dict(json.loads(row["spec"])).sample(rng).to_mesh() for row in rows]
