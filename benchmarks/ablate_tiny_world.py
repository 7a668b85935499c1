"""The paper's ablations in miniature, on the tiny world: every arm trained from scratch at the same budget, per seed.

    python benchmarks/ablate_tiny_world.py --work runs/ablation                   # train + evaluate what is missing
    python benchmarks/ablate_tiny_world.py --work runs/ablation --table-only      # print the table of what finished
    python benchmarks/ablate_tiny_world.py --work runs/ablation-gpu --device cuda --steps 2000 --num 90 --seeds 0 1 2

Arms (each a tiny CG-MLLM of the shipped size trained on the latents of the shipped ShapeVAE, one stage of
`--steps` optimizer steps at batch 16, condition dropout 10%, learning rate 1e-3; only the named setting differs
from `mot`):

* `mot`            Mixture of Transformers (TokenAR + BlockAR weights), N = 16 latent rows, the whole object as one
                   block, joint tasks (text -> 3D, mesh -> caption, image -> caption, image -> 3D): the reference;
* `shared`         one shared transformer (`mixture_of_transformers=False`: 3D rows through the TokenAR weights),
                   the paper's MoT vs shared row (p-FID 30.6 vs 44.9);
* `tokens32`, `tokens64`  N = 32 / 64 latent rows (the ShapeVAE encodes to N rows by taking N query points), the
                   paper's 512 vs 4096 rows;
* `token_by_token` one latent row per block (`shape_block_size=1`): generation samples the object row by row, each
                   row with the full denoising schedule, instead of all rows at once;
* `caption_only`   mesh -> caption and image -> caption only, no generation task: "generation feeds understanding".

Each arm x seed writes `WORK/results/<arm>-seed<seed>.json`; a rerun skips finished ones, continues an arm whose
training was cut from its newest checkpoint (`cgmllm-train --resume`, every `--steps // 4` steps) and re-evaluates
an arm whose evaluation was cut. The data set (tiny world, seed 0, 2000 + 200) and the latent cache (N = 16, 32, 64)
are built once into `WORK/data` and `WORK/latents`; the shipped `tiny_world.yaml` the arms start from is copied to
`WORK/base_config.yaml` on the first run and read from there afterwards. Scores are on the first `--num`
single-shape held-out rows (novel and seen combinations alternating), with `cgmllm.training.tiny_world.evaluation`:

* text -> 3D family accuracy (all / novel / seen), p-FID of the generated shapes against the held-out meshes (the
  tiny world's PointNet++), seconds per shape to sample the latents (`output_type="latent"`, no mesh extraction);
* mesh -> caption and image -> caption family-word accuracy.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml


REPO = Path(__file__).resolve().parents[1]
SHIPPED_VAE = REPO / "checkpoints" / "tiny-world" / "vae"
BASE_CONFIG = REPO / "training" / "configs" / "tiny_world.yaml"
LATENT_SIZES = (16, 32, 64)
JOINT_TASKS = {"text_to_shape": 1.0, "shape_caption": 1.0, "image_caption": 0.5, "image_to_shape": 0.5}
ARMS = {
    "mot": {},
    "shared": {"mixture_of_transformers": False},
    "tokens32": {"num_shape_tokens": 32},
    "tokens64": {"num_shape_tokens": 64},
    "token_by_token": {"shape_block_size": 1},
    "caption_only": {"tasks": {"shape_caption": 1.0, "image_caption": 0.5}},
}
ARM_LABELS = {
    "mot": "MoT, N = 16, one block, joint tasks (reference)",
    "shared": "one shared transformer",
    "tokens32": "N = 32 latent rows",
    "tokens64": "N = 64 latent rows",
    "token_by_token": "token by token (1 row per block)",
    "caption_only": "captioning only (no generation)",
}


def log(message: str) -> None:
    print(f"[ablate {time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepare_data(work: Path, seed: int = 0) -> Path:
    """`WORK/data` (the tiny world with rendered views) and `WORK/latents` (shipped ShapeVAE, N = 16 / 32 / 64), each
    written once; the cache is written aside and renamed, so a cut never leaves half a cache."""
    from cgmllm.modeling_shape_vae import ShapeVAE
    from cgmllm.training.data import load_caption_dataset
    from cgmllm.training.preprocess import encode_dataset
    from cgmllm.training.tiny_world import build_tiny_world_dataset

    data, latents = work / "data", work / "latents"
    if not (data / "train" / "metadata.parquet").is_file():
        log("building the tiny world")
        build_tiny_world_dataset(data, num_train=2000, num_heldout=200, render_images=True, seed=seed, num_workers=1)
    if not (latents / "dataset_info.json").is_file():
        log("encoding the latent cache with the shipped ShapeVAE")
        vae = ShapeVAE.from_pretrained(SHIPPED_VAE).eval().requires_grad_(False)
        with torch.no_grad():
            train_set = load_caption_dataset(data, layout="meshfolder", split="train", validate=False)
            encoded = encode_dataset(train_set, vae, list(LATENT_SIZES), seed=seed)
        temporary = work / "latents.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        encoded.save_to_disk(str(temporary))
        os.replace(temporary, latents)
    return latents


def check_arm_folder(run: Path, steps: int, device: str) -> None:
    """An arm folder trained with other `--steps` / `--device` would be resumed (or, finished, loaded) under the new
    ones: refused, from the config it was trained with, before that config is rewritten."""
    path = run / "config.yaml"
    if not path.is_file():
        if (run / "train").exists():
            raise ValueError(f"{run / 'train'} holds training but {path} is missing, so its settings are unknown; "
                             "remove the folder, or choose a new --work.")
        return
    config = yaml.safe_load(path.read_text())
    old = {"steps": config["stages"][0]["max_steps"],
           "device": "cpu" if config["training"].get("use_cpu") else "cuda"}
    new = {"steps": steps, "device": device}
    differing = [f"{key} {old[key]} instead of {new[key]}" for key in new if old[key] != new[key]]
    if differing:
        raise ValueError(f"{run} was trained with other settings ({', '.join(differing)}); rerun with the same "
                         "arguments, or choose a new --work.")


def arm_config(arm: str, seed: int, steps: int, work: Path, device: str = "cpu") -> Path:
    """Write the arm's `cgmllm-train` config (the shipped tiny-world config with one stage) and return its path; an
    arm folder trained with other `steps` / `device` is refused (`check_arm_folder`)."""
    settings = ARMS[arm]
    run = work / "arms" / f"{arm}-seed{seed}"
    check_arm_folder(run, steps, device)
    base = work / "base_config.yaml"
    if not base.is_file():
        # Kept with the work folder: a later sitting trains its arms from the same config even if the shipped one
        # changed in between.
        shutil.copyfile(BASE_CONFIG, base)
    config = yaml.safe_load(base.read_text())
    tokens = settings.get("num_shape_tokens", 16)
    config["seed"] = seed
    config["output_dir"] = str(run / "train")
    config["data"] = {"path": str(work / "latents")}
    config["model"]["tiny"].update(num_shape_tokens=tokens, shape_block_size=settings.get("shape_block_size"),
                                   mixture_of_transformers=settings.get("mixture_of_transformers", True))
    config["tasks"] = settings.get("tasks", JOINT_TASKS)
    config["training"].update(save_strategy="steps", save_steps=max(1, steps // 4), save_total_limit=1,
                              logging_steps=max(1, steps // 10), disable_tqdm=True, use_cpu=device == "cpu")
    config["stages"] = [{"name": "train", "kind": "alignment", "num_shape_tokens": tokens, "condition_dropout": 0.1,
                         "learning_rate": 1.0e-3, "max_steps": steps}]
    run.mkdir(parents=True, exist_ok=True)
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def train_arm(arm: str, seed: int, steps: int, work: Path, device: str = "cpu"):
    """Train (or resume, or load the finished) arm on `device` (the Trainer picks the first GPU for `cuda`); returns
    `(model, processor, train seconds)`."""
    from cgmllm import CGMLLMProcessor
    from cgmllm.training.cli import load_config, run_stages

    config_path = arm_config(arm, seed, steps, work, device)
    run = config_path.parent
    timing = run / "train_seconds.json"
    spent = json.loads(timing.read_text())["seconds"] if timing.is_file() else 0.0
    start = time.perf_counter()
    last = None
    try:
        model, results = run_stages(load_config(config_path), resume=True)
        last = results[-1]
    finally:
        # Sittings add up, a sitting cut by an exception or Ctrl-C included (its steps after the last checkpoint
        # are trained again, and counted again, by the next one); a SIGKILL'ed sitting is not counted.
        if last is None or not last["skipped"]:
            spent += time.perf_counter() - start
            timing.write_text(json.dumps({"seconds": spent,
                                          "train_loss": None if last is None else last["train_loss"]}) + "\n")
    processor = CGMLLMProcessor.from_pretrained(results[-1]["final"])
    return model.eval(), processor, spent


@torch.no_grad()
def evaluate_arm(arm: str, model, processor, rows, num_steps: int, pointnet, device: str = "cpu") -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from cgmllm.modeling_shape_vae import ShapeVAE
    from cgmllm.pipelines import CGMLLMPipeline
    from cgmllm.training.tiny_world.evaluation import (
        image_to_caption,
        point_cloud_distances,
        shape_to_caption,
        text_to_shape,
    )

    vae = ShapeVAE.from_pretrained(SHIPPED_VAE).eval().requires_grad_(False)
    pipe = CGMLLMPipeline(model=model, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                          processor=processor).to(device)
    pipe.set_progress_bar_config(disable=True)
    result = {}
    if ARMS[arm].get("tasks", JOINT_TASKS).get("text_to_shape"):
        generated = text_to_shape(pipe, rows, num_inference_steps=num_steps, guidance_scale=4.0,
                                  octree_resolution=64, seed=0)
        for name, novel in (("novel", True), ("seen", False)):
            hits = [p["predicted"] == p["family"] for p, row in zip(generated["predictions"], rows)
                    if row["novel_combination"] == novel]
            result[f"text_to_shape_{name}"] = sum(hits) / len(hits)
        result["text_to_shape"] = generated["family_accuracy"]
        result["proportion"] = generated["proportion_accuracy"]
        distances = point_cloud_distances(generated["meshes"], [row["mesh"] for row in rows], pointnet)
        result["p_fid"], result["num_empty"] = distances["p_fid"], distances["num_empty"]
        # Sampling time alone (no mesh extraction, which is the same for every arm): 10 prompts in one batch.
        prompts = [row["caption"] for row in rows[:10]]
        generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        synchronize(device)
        tick = time.perf_counter()
        pipe(prompts, num_inference_steps=num_steps, guidance_scale=4.0, generator=generators, output_type="latent")
        synchronize(device)
        result["sample_seconds_per_shape"] = (time.perf_counter() - tick) / len(prompts)
    result["mesh_caption"] = shape_to_caption(pipe, rows)["family_word_accuracy"]
    result["image_caption"] = image_to_caption(pipe, rows)["family_word_accuracy"]
    return result


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work, so that a wall-clock time covers it (nothing to wait for on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def import_everything() -> None:
    """Import every module the job will use now, so that the whole job runs one version of the code even if the
    checkout changes under it (a merge during a long run) and a module first imported late would be the new one."""
    import importlib
    import pkgutil

    for name in ("cgmllm", "cgmllm.pipelines", "cgmllm.training", "cgmllm.training.tiny_world", "cgmllm.evaluation"):
        package = importlib.import_module(name)
        for module in pkgutil.iter_modules(package.__path__):
            if module.name not in ("__main__", "app"):
                importlib.import_module(f"{name}.{module.name}")


def check_settings(path: Path, args, num_rows: int) -> None:
    """A result of other settings in the same work folder would end up in one table with the new ones: refused."""
    result = json.loads(path.read_text())
    wanted = {"steps": args.steps, "num_rows": num_rows, "denoise_steps": args.denoise_steps, "device": args.device}
    differing = {key: (result[key], value) for key, value in wanted.items() if result.get(key, value) != value}
    if differing:
        raise ValueError(f"{path} was measured with other settings ("
                         + ", ".join(f"{key} {old} instead of {new}" for key, (old, new) in differing.items())
                         + "); rerun with the same arguments, or choose a new --work.")


def run(args) -> None:
    from cgmllm.evaluation import tiny_world_pointnet_path
    from cgmllm.training.tiny_world.evaluation import heldout_rows, single_shape_rows

    import_everything()
    work = Path(args.work).resolve()
    (work / "results").mkdir(parents=True, exist_ok=True)
    rows = single_shape_rows(heldout_rows(), args.num)
    pointnet = tiny_world_pointnet_path()
    floor_path = work / "results" / "floor.json"
    # Before any work: every result already here (not only the arms about to run), the floor, and the arm folders
    # about to be trained must have this run's settings, or they would end up in one table with its results.
    for path in sorted((work / "results").glob("*-seed*.json")):
        check_settings(path, args, len(rows))
    if floor_path.is_file() and json.loads(floor_path.read_text())["num_rows"] != len(rows):
        raise ValueError(f"{floor_path} was measured on {json.loads(floor_path.read_text())['num_rows']} rows instead "
                         f"of {len(rows)}; rerun with the same --num, or choose a new --work.")
    for seed in args.seeds:
        for arm in args.arms:
            if not (work / "results" / f"{arm}-seed{seed}.json").is_file():
                check_arm_folder(work / "arms" / f"{arm}-seed{seed}", args.steps, args.device)
    prepare_data(work)
    if not floor_path.is_file():
        # The p-FID of a generator right on every prompt: the same combinations drawn again with new dimensions.
        from cgmllm.training.tiny_world.evaluation import point_cloud_distances, redrawn_meshes

        floor = point_cloud_distances(redrawn_meshes(rows), [row["mesh"] for row in rows], pointnet)
        floor_path.write_text(json.dumps({"p_fid": floor["p_fid"], "num_rows": len(rows)}) + "\n")
    # Seed-major order: every arm's first seed before any second seed, so a cut job still has one seed per arm.
    for seed in args.seeds:
        for arm in args.arms:
            path = work / "results" / f"{arm}-seed{seed}.json"
            if path.is_file():
                log(f"{arm} seed {seed}: done in an earlier run")
                continue
            log(f"{arm} seed {seed}: training {args.steps} steps")
            torch.manual_seed(seed)
            model, processor, seconds = train_arm(arm, seed, args.steps, work, args.device)
            log(f"{arm} seed {seed}: trained in {seconds:.0f} s; evaluating on {len(rows)} held-out rows")
            tick = time.perf_counter()
            result = evaluate_arm(arm, model, processor, rows, args.denoise_steps, pointnet, args.device)
            result.update(arm=arm, seed=seed, steps=args.steps, num_rows=len(rows), denoise_steps=args.denoise_steps,
                          device=args.device,
                          train_seconds=seconds,
                          eval_seconds=time.perf_counter() - tick,
                          parameters=sum(p.numel() for p in model.parameters()))
            temporary = path.with_suffix(".tmp")
            temporary.write_text(json.dumps(result, indent=2) + "\n")
            os.replace(temporary, path)
            log(f"{arm} seed {seed}: {json.dumps({k: v for k, v in result.items() if isinstance(v, float)})}")


COLUMNS = (("text_to_shape", "text->3D family", "pct"), ("text_to_shape_novel", "novel", "pct"),
           ("text_to_shape_seen", "seen", "pct"), ("p_fid", "p-FID", "num"),
           ("sample_seconds_per_shape", "sampling s / shape", "sec"), ("mesh_caption", "mesh caption family", "pct"),
           ("image_caption", "image caption family", "pct"), ("train_seconds", "train s", "int"))


def _cell(values: list[float], kind: str) -> str:
    if not values:
        return "-"
    scale = 100 if kind == "pct" else 1
    mean = statistics.fmean(values) * scale
    spread = (max(values) - min(values)) * scale / 2  # half the range: with 2 seeds, the distance to either
    digits = {"pct": 0, "num": 1, "sec": 2, "int": 0}[kind]
    unit = "%" if kind == "pct" else ""
    return f"{mean:.{digits}f}{unit} ± {spread:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}{unit}"


def table(work: Path, arms, seeds) -> str:
    results = {}
    for path in sorted((work / "results").glob("*-seed*.json")):
        result = json.loads(path.read_text())
        results.setdefault(result["arm"], []).append(result)
    lines = ["| arm | seeds | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for arm in arms:
        done = sorted(results.get(arm, []), key=lambda r: r["seed"])
        if not done:
            lines.append(f"| {ARM_LABELS[arm]} | not run | " + " | ".join("-" for _ in COLUMNS) + " |")
            continue
        cells = [_cell([r[key] for r in done if r.get(key) is not None], kind) for key, _, kind in COLUMNS]
        seed_list = ", ".join(str(r["seed"]) for r in done)
        lines.append(f"| {ARM_LABELS[arm]} | {seed_list} | " + " | ".join(cells) + " |")
    missing = [f"{arm}-seed{seed}" for seed in seeds for arm in arms if not (work / "results" /
                                                                          f"{arm}-seed{seed}.json").is_file()]
    floor = work / "results" / "floor.json"
    if floor.is_file():
        lines.append(f"\np-FID floor (the prompts' combinations drawn again with new dimensions, scored the same way): "
                     f"{json.loads(floor.read_text())['p_fid']:.1f}.")
    if missing:
        lines.append(f"\nNot finished: {', '.join(missing)}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work", default="runs/ablation", help="folder for data, latents, runs and results")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps per arm (batch 16)")
    parser.add_argument("--num", type=int, default=30, help="held-out single-shape rows per measurement")
    parser.add_argument("--denoise-steps", type=int, default=25, help="sampling steps of text -> 3D")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--device", default="cpu",
                        help="cpu or cuda: where the arms train and sample (the data and latent cache are built on "
                             "the CPU); results of another device are not mixed into one work folder's table")
    parser.add_argument("--table-only", action="store_true", help="print the table of the finished arms and stop")
    args = parser.parse_args(argv)
    if not args.table_only:
        if args.num < 2:
            parser.error(f"--num {args.num}: at least 2 rows, so that the novel and the seen subsets each have one.")
        from cgmllm.training.devices import parse_device_argument

        device = parse_device_argument(parser, args.device)
        if device.type not in ("cpu", "cuda") or device.index is not None:
            parser.error(f"--device {args.device}: the arms run on cpu or cuda (pick the GPU with "
                         "CUDA_VISIBLE_DEVICES).")
        args.device = device.type
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.table_only:
        run(args)
    print(table(Path(args.work).resolve(), args.arms, args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
