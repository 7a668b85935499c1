# Copyright 2026 The CG-MLLM Authors. Apache-2.0.
"""`cgmllm-eval`: the paper's metrics on files, printed as a table and written as JSON.

    cgmllm-eval generation --pred DIR --ref DIR --pointnet pointnet.pt [--clip CLIP_DIR] [--prompts prompts.jsonl]
                           [--iqa] [--num-points 4096] [--kid-subset-size 1000] [-o results.json]
    cgmllm-eval captions --pred preds.jsonl --ref refs.jsonl [--wordnet DIR] [--sbert DIR] [--simcse DIR]
                         [-o results.json]

generation: `--pred` and `--ref` are folders of meshes (glb / gltf / obj / ply / stl / off) or point clouds (`.npy`,
`[num_points, >= 3]`, xyz first). Meshes are sampled uniformly on the surface (`--num-points`, fixed `--seed`). p-FID /
p-KID compare the two sets (they need not pair up). `--clip` renders 8 views of every predicted mesh and of the
reference mesh with the same file stem and reports the image-image CLIP score; with `--prompts` (JSON lines
`{"id": stem, "prompt": text}`) also the text-image CLIP score. `--iqa` adds pyiqa's CLIP-IQA+ and MUSIQ of the views.

captions: JSON lines with an `id` (or `object_id`) and the text: predictions under `caption` (or `model_output`),
references under `caption` / `ground_truth` (one string) or `captions` (a list). Every reference id needs a prediction
and every prediction a reference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


POINT_CLOUD_SUFFIXES = (".npy",)


class EvalError(Exception):
    """A user error: printed as `cgmllm-eval: error: ...`, exit status 2."""


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


def list_shapes(folder: str, what: str) -> list[Path]:
    """Mesh and point-cloud files of a folder (not recursive), sorted by name."""
    from ..mesh_utils import SUPPORTED_MESH_TYPES

    path = Path(folder)
    if not path.is_dir():
        raise EvalError(f"{what} {folder}: no such folder.")
    suffixes = {f".{kind}" for kind in SUPPORTED_MESH_TYPES} | set(POINT_CLOUD_SUFFIXES)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise EvalError(f"{what} {folder}: no meshes ({', '.join(sorted(suffixes))}) in the folder.")
    return files


def load_clouds(files: list[Path], num_points: int, seed: int, desc: str):
    """Point clouds `[len(files), num_points, 3]` float32: meshes sampled on the surface, `.npy` clouds subsampled
    (without replacement, same seed) to `num_points`."""
    import numpy as np
    from tqdm.auto import tqdm

    from ..mesh_utils import load_mesh, sample_uniform_surface

    clouds = np.empty((len(files), num_points, 3), dtype=np.float32)
    for i, file in enumerate(tqdm(files, desc=desc)):
        try:
            if file.suffix.lower() == ".npy":
                points = np.load(file, allow_pickle=False)
                if points.ndim != 2 or points.shape[1] < 3 or len(points) < num_points:
                    raise ValueError(f"expected an array [>= {num_points} points, >= 3] with xyz first, got shape "
                                     f"{points.shape}")
                keep = np.sort(np.random.default_rng(seed).choice(len(points), num_points, replace=False))
                clouds[i] = points[keep, :3]
            else:
                clouds[i] = sample_uniform_surface(load_mesh(file), num_points, seed=seed)[0]
        except ValueError as error:
            raise EvalError(f"{file}: {error}") from error
    return clouds


def read_jsonl(path: str, what: str, text_keys: tuple[str, ...]) -> dict[str, object]:
    """`{id: text or [texts]}` from JSON lines; errors name the file and line."""
    file = Path(path)
    if not file.is_file():
        raise EvalError(f"{what} {path}: no such file.")
    records: dict[str, object] = {}
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise EvalError(f"{path}:{number}: not JSON ({error.msg}).") from error
        if not isinstance(record, dict):
            raise EvalError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}.")
        key = next((k for k in ("id", "object_id") if k in record), None)
        field = next((k for k in text_keys if k in record), None)
        if key is None or field is None:
            raise EvalError(f"{path}:{number}: needs an 'id' (or 'object_id') and one of {list(text_keys)}; "
                            f"found keys {sorted(record)}.")
        identifier, text = str(record[key]), record[field]
        if identifier in records:
            raise EvalError(f"{path}:{number}: id {identifier!r} appears twice.")
        if not (isinstance(text, str) or (isinstance(text, list) and text and all(isinstance(t, str) for t in text))):
            raise EvalError(f"{path}:{number}: {field!r} must be a string or a non-empty list of strings.")
        records[identifier] = text
    if not records:
        raise EvalError(f"{what} {path}: no records.")
    return records


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    print(f"\n{title}\n| metric | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


def check_output(path: str) -> None:
    if not Path(path).parent.is_dir():
        raise EvalError(f"--output {path}: the folder {Path(path).parent} does not exist.")


def write_json(path: str, results: dict) -> None:
    output = Path(path)
    output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\nresults written to {output}")


# ----------------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------------


def run_generation(args) -> dict:
    from .point_cloud_metrics import compute_pfid_pkid, load_pointnet

    pred_files, ref_files = list_shapes(args.pred, "--pred"), list_shapes(args.ref, "--ref")
    if min(len(pred_files), len(ref_files)) < args.kid_subset_size:
        raise EvalError(f"p-KID subsets of {args.kid_subset_size} need at least that many shapes in each folder; "
                        f"--pred has {len(pred_files)}, --ref {len(ref_files)}. Pass --kid-subset-size "
                        f"{min(len(pred_files), len(ref_files))} or less.")
    try:
        model = load_pointnet(args.pointnet, trust_checkpoint=args.trust_checkpoint)
    except ValueError as error:
        raise EvalError(str(error)) from error
    pred = load_clouds(pred_files, args.num_points, args.seed, "sampling --pred")
    ref = load_clouds(ref_files, args.num_points, args.seed, "sampling --ref")
    try:
        metrics = compute_pfid_pkid(None, pred, ref, model=model, batch_size=args.batch_size,
                                    kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                                    seed=args.seed, progress=True)
    except ValueError as error:
        raise EvalError(str(error)) from error
    results = {"p_fid": metrics["p_fid"], "p_kid": metrics["p_kid"], "p_kid_std": metrics["p_kid_std"],
               "num_pred": len(pred_files), "num_ref": len(ref_files),
               "settings": {"pointnet": str(args.pointnet), "num_points": args.num_points, "seed": args.seed,
                            "batch_size": args.batch_size, "kid_subsets": args.kid_subsets,
                            "kid_subset_size": args.kid_subset_size}}
    rows = [(f"p-FID ({len(pred_files)} vs {len(ref_files)} shapes)", f"{metrics['p_fid']:.3f}"),
            ("p-KID", f"{metrics['p_kid']:.5f} ± {metrics['p_kid_std']:.5f}"),
            ("p-KID x100", f"{100 * metrics['p_kid']:.3f}")]
    if args.clip or args.iqa:
        results.update(render_metrics(args, pred_files, ref_files, rows))
    print_table(f"generation: {args.pred} vs {args.ref}", rows)
    return results


def render_metrics(args, pred_files: list[Path], ref_files: list[Path], rows: list) -> dict:
    """CLIP / CLIP-IQA+ / MUSIQ on the rendered views of the predicted meshes (pairs by file stem for CLIP)."""
    import numpy as np
    from tqdm.auto import tqdm

    from .image_metrics import CLIPScorer, iqa_scores, render_eval_views

    meshes = [p for p in pred_files if p.suffix.lower() not in POINT_CLOUD_SUFFIXES]
    if not meshes:
        raise EvalError("--clip / --iqa render meshes, but --pred holds only point clouds.")
    references = {p.stem: p for p in ref_files if p.suffix.lower() not in POINT_CLOUD_SUFFIXES}
    prompts = read_jsonl(args.prompts, "--prompts", ("prompt", "caption")) if args.prompts else {}
    if args.clip:
        unpaired = [p.name for p in meshes if p.stem not in references]
        if unpaired:
            raise EvalError(f"--clip compares each predicted mesh with the reference mesh of the same file stem; no "
                            f"reference for {unpaired[:5]}{' ...' if len(unpaired) > 5 else ''}.")
        missing = [p.stem for p in meshes if prompts and p.stem not in prompts]
        if missing:
            raise EvalError(f"--prompts has no prompt for {missing[:5]}.")
        try:
            scorer = CLIPScorer(args.clip)
        except ValueError as error:
            raise EvalError(str(error)) from error
    image_clip, text_clip, iqa = [], [], {name: [] for name in ("clipiqa+", "musiq")}
    for mesh in tqdm(meshes, desc="rendering and scoring views"):
        try:
            views = render_eval_views(mesh, args.image_size)
            if args.clip:
                image_clip.append(scorer.score(views, reference=render_eval_views(references[mesh.stem],
                                                                                  args.image_size)))
                if prompts:
                    text_clip.append(scorer.score(views, prompt=str(prompts[mesh.stem])))
            if args.iqa:
                for name, weights in (("clipiqa+", args.clipiqa_weights), ("musiq", args.musiq_weights)):
                    iqa[name].append(float(np.mean(iqa_scores(views, name, weights))))
        except ValueError as error:
            raise EvalError(f"{mesh}: {error}") from error
    results = {}
    if image_clip:
        results["clip_image"] = float(np.mean(image_clip))
        rows.append((f"CLIP image-image x100 ({len(image_clip)} meshes, 8 views)", f"{results['clip_image']:.2f}"))
    if text_clip:
        results["clip_text"] = float(np.mean(text_clip))
        rows.append(("CLIP text-image x100", f"{results['clip_text']:.2f}"))
    for name, values in iqa.items():
        if values:
            results[name] = float(np.mean(values))
            rows.append((f"{'CLIP-IQA+' if name == 'clipiqa+' else 'MUSIQ'}", f"{results[name]:.3f}"))
    return results


def run_captions(args) -> dict:
    from .caption_metrics import caption_metrics

    predictions = read_jsonl(args.pred, "--pred", ("caption", "model_output"))
    references = read_jsonl(args.ref, "--ref", ("captions", "caption", "ground_truth"))
    missing, extra = sorted(set(references) - set(predictions)), sorted(set(predictions) - set(references))
    if missing or extra:
        raise EvalError(f"ids of --pred and --ref differ: {len(missing)} reference id(s) without a prediction "
                        f"{missing[:5]}, {len(extra)} prediction id(s) without a reference {extra[:5]}.")
    ids = sorted(references)
    for identifier in ids:
        if not isinstance(predictions[identifier], str):
            raise EvalError(f"--pred id {identifier!r}: a prediction is one string, got a list.")
    try:
        result = caption_metrics([predictions[i] for i in ids], [references[i] for i in ids],
                                 wordnet_dir=args.wordnet, sbert_model=args.sbert, simcse_model=args.simcse,
                                 progress=True)
    except ValueError as error:
        raise EvalError(str(error)) from error
    names = {"bleu_1": "BLEU-1", "bleu_2": "BLEU-2", "bleu_3": "BLEU-3", "bleu_4": "BLEU-4", "rouge_1": "ROUGE-1",
             "rouge_2": "ROUGE-2", "rouge_l": "ROUGE-L", "meteor": "METEOR", "sbert_similarity": "Sentence-BERT",
             "simcse_similarity": "SimCSE"}
    print_table(f"captions: {len(ids)} samples, x100 (PointLLM's protocol)",
                [(names[name], f"{value:.2f}") for name, value in result["scores"].items()])
    return {"scores": result["scores"], "count": result["count"],
            "per_sample": [{"id": i, "prediction": predictions[i], "reference": references[i], "scores": s}
                           for i, s in zip(ids, result["per_sample"])]}


def build_parser() -> argparse.ArgumentParser:
    from .point_cloud_metrics import DEFAULT_NUM_POINTS, POINT_E_BATCH_SIZE

    parser = argparse.ArgumentParser(prog="cgmllm-eval", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generation", help="p-FID / p-KID (and CLIP, CLIP-IQA+, MUSIQ) of generated shapes",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen.add_argument("--pred", required=True, help="folder of generated meshes / .npy point clouds")
    gen.add_argument("--ref", required=True, help="folder of reference meshes / .npy point clouds")
    gen.add_argument("--pointnet", required=True, help="PointNet++ checkpoint in Point-E's layout (pointnet.pt)")
    gen.add_argument("--trust-checkpoint", action="store_true",
                     help="unpickle the checkpoint with weights_only=False (only for files you trust)")
    gen.add_argument("--num-points", type=int, default=DEFAULT_NUM_POINTS, help="surface points per shape")
    gen.add_argument("--seed", type=int, default=0, help="surface sampling and KID subsets")
    gen.add_argument("--batch-size", type=int, default=POINT_E_BATCH_SIZE,
                     help="Point-E's batch: cloud i's farthest point sampling starts at point i %% batch size")
    gen.add_argument("--kid-subsets", type=int, default=100)
    gen.add_argument("--kid-subset-size", type=int, default=1000)
    gen.add_argument("--clip", default=None, help="local CLIP folder: CLIP score of 8 rendered views")
    gen.add_argument("--prompts", default=None, help="JSON lines {id: mesh stem, prompt}: text-image CLIP score")
    gen.add_argument("--iqa", action="store_true", help="CLIP-IQA+ and MUSIQ of the views (needs pyiqa)")
    gen.add_argument("--clipiqa-weights", default=None, help="local CLIP-IQA+ weights file for pyiqa")
    gen.add_argument("--musiq-weights", default=None, help="local MUSIQ weights file for pyiqa")
    gen.add_argument("--image-size", type=int, default=224, help="side of the rendered views")
    gen.add_argument("-o", "--output", default="eval_generation.json", help="JSON file of the results")
    cap = commands.add_parser("captions", help="BLEU-1..4, ROUGE, METEOR (and SBERT / SimCSE) of captions",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cap.add_argument("--pred", required=True, help="JSON lines {id, caption}")
    cap.add_argument("--ref", required=True, help="JSON lines {id, caption} or {id, captions: [...]}")
    cap.add_argument("--wordnet", default=None, help="WordNet 3.0 folder for METEOR (default: see load_wordnet)")
    cap.add_argument("--sbert", default=None, help="local Sentence-BERT folder (e.g. all-mpnet-base-v2)")
    cap.add_argument("--simcse", default=None, help="local SimCSE folder (e.g. sup-simcse-roberta-large)")
    cap.add_argument("-o", "--output", default="eval_captions.json", help="JSON file of the results")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_output(args.output)  # before the work, not after it
        if args.command == "generation":
            if args.num_points < 512:
                raise EvalError(f"--num-points {args.num_points}: PointNet++ needs at least 512 points per shape.")
            results = run_generation(args)
        else:
            results = run_captions(args)
        write_json(args.output, results)
    except EvalError as error:
        print(f"cgmllm-eval: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
