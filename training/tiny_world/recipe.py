"""One command from nothing to a CG-MLLM pipeline folder trained on the tiny world, on a CPU:

    python -m cgmllm.training.tiny_world.recipe --out runs/tiny-world [--config tiny_world.yaml --set KEY=VALUE ...]

1. build the tiny world (`build_tiny_world_dataset`, with a rendered view per sample unless `--no-images`) into
   `OUT/data`;
2. train a ShapeVAE on it (`cgmllm.training.train_vae`, with random per-axis stretches `--vae-stretch` and random
   rotations `--vae-rotate` of the training shapes) into `OUT/vae_run/vae`;
3. encode every training shape at each stage resolution of the config into a latent cache `OUT/latents`
   (`preprocess.encode_dataset` + `save_to_disk`, columns `latents_<N>`, the views carried along for the image
   tasks);
4. run the config's stages (`cgmllm-train`: stage 1 alignment + progressive stage 2) into `OUT/stages`;
5. save the pipeline (model + VAE + scheduler + processor) to `OUT/pipeline` (`cgmllm generate --model OUT/pipeline`);
6. train the tiny world's PointNet++ p-FID classifier (`cgmllm.training.tiny_world.pointnet`, Point-E's architecture
   and file layout) into `OUT/pointnet` (`pointnet.pt`, `summary.json` with its held-out accuracy, model card), the
   feature extractor of `benchmarks/eval_tiny_world.py`'s p-FID / p-KID rows (`--no-pointnet` skips it).

Every phase's wall time goes to `OUT/timings.json`.

Several sittings (`--resume`): every finished phase is recorded in `OUT/recipe_state.json`, and each phase keeps
its own checkpoints: the ShapeVAE every `--vae-save-every` steps (`train_vae --resume`), the latent cache written to
a temporary folder and renamed, the stages through `cgmllm-train --resume`; the PointNet++ phase (minutes) is redone
whole if it was interrupted. After a kill (or Ctrl-C) at any moment,
the same command with `--resume` continues where it stopped and trains exactly what one uninterrupted run trains;
`--vae-stop-after K` ends a sitting after K more ShapeVAE steps. A second run into the same `--out` without
`--resume` is refused, and so is `--resume` with other arguments (named) than the run it continues.

Device, speed and seeds (the defaults run the CPU recipe as shipped, unchanged):

* `--device cuda` runs the ShapeVAE, the latent cache and the stages on the GPU (the data set is built on the CPU;
  choose a GPU with `CUDA_VISIBLE_DEVICES`); `--device cpu` is the default. The device used is recorded in
  `summary.json` and the model card. A missing GPU is an error before any work.
* `--compile` runs the ShapeVAE's loss (`train_vae --compile`) and the CG-MLLM (`training.torch_compile`) through
  `torch.compile`: the same loss and gradients as eager to rounding (tests/test_compiled_training.py). Off by default:
  on a 2-core CPU it gains 1.08x (ShapeVAE) and 1.35x (CG-MLLM) steps per second
  (`benchmarks/bench_training_step.py`), but compiles for minutes, again when a shape changes (the ShapeVAE's number
  of latents, each stage resolution): on a busy 2-core machine a tiny ShapeVAE's loss took 97 s to compile and 127 s
  more at its first other number of latents.
* `--seed S` seeds the ShapeVAE, the latent cache and the stages; the data set and its held-out split follow it
  unless `--data-seed` fixes them (`--data-seed 0 --seed 1` is a second training seed of the shipped data).
* `--batch-scale K` trains every phase on K times larger batches for K times fewer steps (ShapeVAE batch, warm-up
  and steps; each stage's batch and `max_steps`), so each phase sees the same number of samples (the same tokens) in
  fewer, larger steps; learning rates are kept. 1 by default; on a GPU, where a tiny model's batch of 16 leaves the
  device mostly idle, a larger K is what makes the recipe take minutes. A different K is a different run (another
  optimisation path), so its checkpoint has to be evaluated again.
"""

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Sequence


DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_world.yaml"


TINY_WORLD_USAGE = """```python
import torch
from cgmllm import CGMLLMPipeline, render_mesh
from cgmllm.cli import default_model_dir
from cgmllm.training.tiny_world import DATASET_VIEW

pipe = CGMLLMPipeline.from_pretrained(default_model_dir())   # this folder; CPU is fine
settings = dict(num_inference_steps=25, guidance_scale=4.0, octree_resolution=64)
out = pipe("a tall cylinder", generator=torch.Generator().manual_seed(0), **settings)
out.mesh.export("cylinder.glb")
print(pipe.caption(mesh="cylinder.glb"))

# Views as the tiny world renders them: 128 pixels, the data set's camera.
render_mesh(out.mesh, 128, **DATASET_VIEW).save("view.png")
print(pipe.caption(image="view.png"))
pipe(image="view.png", generator=torch.Generator().manual_seed(0), **settings).mesh.export("from_view.glb")
```

or from the shell: `cgmllm generate "a tall cylinder" -o cylinder.glb`, `cgmllm caption cylinder.glb`,
`cgmllm generate --image view.png -o from_view.glb`. It knows only the tiny world: 9 shape families (sphere, box,
cylinder, cone, pyramid, tube, torus, capsule, ellipsoid) with proportions (regular / tall / flat), thickness and
orientation words, seen as meshes or as 128-pixel renders from one camera."""

TASK_NAMES = {"text_to_shape": "text -> 3D", "image_to_shape": "image -> 3D", "shape_caption": "3D -> caption",
              "image_caption": "image -> caption"}


def write_model_card(folder: str | Path, summary: dict, evaluation: str = "") -> Path:
    """`folder/README.md`: the model card of a tiny-world pipeline, with the recipe's phases and losses."""
    from ..hub import render_model_card

    folder = Path(folder)
    timings = summary["timings"]
    vae = summary.get("vae") or {}
    # Sizes as saved in the folder, so the card cannot disagree with the weights next to it.
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    text_config = json.loads((folder / "model" / "config.json").read_text())["text_config"]
    lines = [
        f"Trained on {summary.get('device') or 'a CPU'} by one command, "
        "`python -m cgmllm.training.tiny_world.recipe --out DIR` "
        "(config `cgmllm/training/configs/tiny_world.yaml`), from nothing: the procedural tiny-world data set, a "
        f"ShapeVAE ({vae_config['num_latents']} latents x {vae_config['embed_dim']} channels), then a tiny CG-MLLM "
        f"(hidden {text_config['hidden_size']}, {text_config['num_hidden_layers']} MoT layers, BBPE tokenizer trained "
        "on the captions) through `cgmllm-train`: stage 1 alignment at N = 16 with 90% condition dropout, stage 2 "
        "progressive N = 16 -> 32 -> 64 with dropout 50% -> 10%; tasks "
        + summary.get("tasks", "text -> 3D, 3D -> caption") + ".",
        "",
        "| phase | wall time (s) |", "|---|---|",
        *[f"| {name} | {seconds:.0f} |" for name, seconds in timings.items()],
        f"| total | {sum(timings.values()):.0f} |",
    ]
    augment = vae.get("augment") or {}
    if augment:
        rotations = (f"random rotations of {augment['rotate']:.0%} of the training samples" if augment["rotate"]
                     else "no rotations")
        lines += ["", f"ShapeVAE augmentation: random per-axis stretches up to {augment['stretch']:g}x, {rotations}."]
    if vae.get("heldout"):
        lines += ["", f"ShapeVAE held-out volume IoU at training end: {vae['heldout']['iou']:.3f}."]
    if summary.get("stages"):
        lines += ["", "Final training loss per stage: " + ", ".join(
            f"{stage['stage']} {stage['train_loss']:.3f}" for stage in summary["stages"]) + "."]
    card = render_model_card(
        "cg-mllm/tiny-world", model_name="CG-MLLM tiny world",
        model_description="A tiny CG-MLLM trained on the tiny world, the procedural 3D caption set of the `cg-mllm` "
                          "package: it generates simple shapes from text or a rendered view and captions meshes and "
                          "views, on a CPU in seconds. It is the package's default model and its end-to-end proof "
                          "that the method works; it is not a general 3D model.",
        usage=TINY_WORLD_USAGE, training_summary="\n".join(lines), evaluation=evaluation,
        base_model=None, datasets=[], tags=["tiny-world"],  # trained from scratch: no base model
    )
    path = Path(folder) / "README.md"
    card.save(path)
    return path


STATE_FILE = "recipe_state.json"
# Arguments that may differ between the sittings of one run (they do not change what is computed).
_SITTING_ARGS = ("resume", "threads", "num_workers", "vae_stop_after", "vae_save_every")


def scale_batches(config: dict, factor: int) -> dict:
    """`--batch-scale`: every stage of a loaded config on `factor` times larger batches for `factor` times fewer
    steps (rounded up), so that it trains on the same number of samples; in place, returned. A stage's own
    `per_device_train_batch_size` is scaled, else the `training` one (Trainer's default 8 where neither is set)."""
    if factor < 1:
        raise ValueError(f"--batch-scale must be a whole number >= 1, got {factor}.")
    if factor == 1:
        return config
    default = (config.get("training") or {}).get("per_device_train_batch_size", 8)
    for stage in config["stages"]:
        if stage.max_steps is None or stage.max_steps <= 0:
            raise ValueError(f"--batch-scale needs max_steps on every stage; stage {stage.name!r} trains by epochs "
                             "(an epoch is the same number of samples at any batch size: scale its batch instead).")
        stage.per_device_train_batch_size = (stage.per_device_train_batch_size or default) * factor
        stage.max_steps = -(-stage.max_steps // factor)
    return config


def _run_key(args) -> dict:
    key = {name: value for name, value in sorted(vars(args).items()) if name not in _SITTING_ARGS}
    key["config"] = Path(args.config).read_text()  # the config's contents, not its path
    return key


def _load_state(out: Path, args) -> list[str]:
    """The phases an earlier sitting of this run finished (empty for a new run); refuses what cannot continue."""
    path = out / STATE_FILE
    if not path.is_file():
        if args.resume:
            print(f"[recipe] --resume: no {STATE_FILE} in {out}; starting from the beginning", flush=True)
        return []
    state = json.loads(path.read_text())
    if not args.resume:
        raise ValueError(f"{out} holds a recipe run (finished phases: {', '.join(state['done']) or 'none'}); pass "
                         "--resume to continue it, or choose a new --out.")
    from ..train_vae import differing_run_arguments

    differing = differing_run_arguments(state["args"], _run_key(args), build_parser())
    if differing:
        raise ValueError(f"--resume: {out} was started with other arguments ({', '.join(differing)}); resume with "
                         "the same arguments and config, or choose a new --out.")
    return list(state["done"])


def stage_overrides(args, out: Path) -> list[str]:
    """The `--set` assignments the recipe gives `cgmllm-train`: its own folders, the seed, the device and compile
    options, then the user's `--set` (so that theirs win), then `--embed-dim`."""
    overrides = [f"data.path={out / 'latents'}", f"output_dir={out / 'stages'}", "shape_vae=null", f"seed={args.seed}",
                 f"training.use_cpu={str(args.device == 'cpu').lower()}",
                 *(["training.torch_compile=true"] if args.compile else []), *args.overrides]
    if args.embed_dim is not None:  # the VAE's latent channels are the model's shape latent channels
        overrides.append(f"model.tiny.shape_latent_channels={args.embed_dim}")
    return overrides


def vae_arguments(args, world: Path, vae_out: Path, sizes: Sequence[int], embed_dim: int) -> list[str]:
    """The `train_vae` command line of the recipe's ShapeVAE phase (`--batch-scale K`: K times the batch for K times
    fewer steps and warm-up steps, the same samples)."""
    scale = args.batch_scale
    steps = -(-args.vae_steps // scale)
    return [
        "--data", str(world), "--out", str(vae_out), "--steps", str(steps),
        "--warmup", str(max(1, args.vae_warmup // scale)), "--batch-size", str(args.vae_batch_size * scale),
        "--device", args.device, *(["--compile"] if args.compile else []),
        "--lr", str(args.vae_lr), "--num-latents", str(max(sizes)), "--min-latents", str(min(sizes)),
        "--embed-dim", str(embed_dim), "--width", str(args.vae_width),
        "--stretch", str(args.vae_stretch), "--rotate", str(args.vae_rotate),
        "--num-near", str(args.num_near), "--num-uniform", str(args.num_uniform),
        "--queries-per-step", str(args.queries_per_step),
        "--num-workers", str(args.num_workers or 0), "--seed", str(args.seed),
        "--log-every", str(max(1, steps // 10)), "--save-every", str(args.vae_save_every),
        *(["--resume"] if args.resume else []),
        *(["--stop-after", str(args.vae_stop_after)] if args.vae_stop_after else []),
    ]


def run_recipe(args) -> dict:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from cgmllm import CGMLLMProcessor
    from cgmllm.modeling_shape_vae import ShapeVAE
    from cgmllm.pipelines import CGMLLMPipeline

    from ..cli import load_config, run_stages
    from ..collator import IMAGE_TASKS
    from ..data import load_caption_dataset
    from ..preprocess import encode_dataset
    from .dataset import build_tiny_world_dataset
    from ..devices import describe_device, resolve_device
    from ..train_vae import main as train_vae_main

    device = resolve_device(args.device)  # a missing GPU is an error before any work
    if device.index is not None:
        raise ValueError(f"--device {args.device}: the stages run through transformers' Trainer, which takes the "
                         "first visible GPU; choose it with CUDA_VISIBLE_DEVICES and pass --device cuda.")
    if args.batch_scale < 1:
        raise ValueError(f"--batch-scale must be a whole number >= 1, got {args.batch_scale}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = scale_batches(load_config(args.config, stage_overrides(args, out)), args.batch_scale)  # before any work
    embed_dim = ((config.get("model") or {}).get("tiny") or {}).get("shape_latent_channels")
    if embed_dim is None:
        raise ValueError("The recipe trains a tiny model from config: its config needs "
                         "model.tiny.shape_latent_channels (the ShapeVAE's latent channels).")
    sizes = sorted({stage.num_shape_tokens for stage in config["stages"]})
    done = _load_state(out, args)
    timings = json.loads((out / "timings.json").read_text()) if done and (out / "timings.json").is_file() else {}

    def phase(name, start):
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 2)  # summed over sittings
        print(f"[recipe] {name}: {timings[name]:.1f}s", flush=True)
        (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
        if name not in done:
            done.append(name)
        (out / STATE_FILE).write_text(json.dumps({"args": _run_key(args), "done": done}, indent=2) + "\n")

    (out / STATE_FILE).write_text(json.dumps({"args": _run_key(args), "done": done}, indent=2) + "\n")
    world = out / "data"
    if "dataset" in done:
        print("[recipe] dataset: done in an earlier sitting", flush=True)
    else:
        start = time.perf_counter()
        if not (world / "train" / "metadata.parquet").is_file() or args.rebuild:
            build_tiny_world_dataset(world, num_train=args.num_train, num_heldout=args.num_heldout,
                                     render_images=args.images, num_workers=args.num_workers,
                                     seed=args.seed if args.data_seed is None else args.data_seed)
        phase("dataset", start)

    if "vae" in done:
        print("[recipe] vae: done in an earlier sitting", flush=True)
        vae_metrics = json.loads((out / "vae_run" / "metrics.json").read_text())
    else:
        start = time.perf_counter()
        vae_metrics = train_vae_main(vae_arguments(args, world, out / "vae_run", sizes, embed_dim))
        if "stopped_at" in vae_metrics:
            timings["vae"] = round(timings.get("vae", 0.0) + time.perf_counter() - start, 2)
            (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
            print(f"[recipe] stopped in the ShapeVAE phase at step {vae_metrics['stopped_at']} of "
                  f"{vae_metrics['steps']} (--vae-stop-after); continue with the same command and --resume", flush=True)
            return {"stopped": "vae", **vae_metrics}
        phase("vae", start)

    vae = ShapeVAE.from_pretrained(out / "vae_run" / "vae").eval().requires_grad_(False).to(device)
    if "latents" in done:
        print("[recipe] latents: done in an earlier sitting", flush=True)
    else:
        start = time.perf_counter()
        with torch.no_grad():
            # The tiny world is a meshfolder: read by the same loader as any user data set (paraphrases included).
            train_set = load_caption_dataset(world, layout="meshfolder", split="train", validate=False)
            encoded = encode_dataset(train_set, vae, sizes, seed=args.seed)
        # Written aside and renamed: a kill while writing never leaves a half cache that looks finished.
        temporary = out / "latents.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        encoded.save_to_disk(str(temporary))
        shutil.rmtree(out / "latents", ignore_errors=True)
        os.replace(temporary, out / "latents")
        phase("latents", start)

    start = time.perf_counter()
    model, results = run_stages(config, resume=True if args.resume else None)
    phase("stages", start)

    start = time.perf_counter()
    processor = CGMLLMProcessor.from_pretrained(results[-1]["final"])
    # Saved from the CPU: the folder loads the same on any machine.
    pipe = CGMLLMPipeline(model=model.to("cpu").eval(), vae=vae.to("cpu"),
                          scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                          processor=processor)
    pipe.save_pretrained(out / "pipeline")
    phase("save", start)

    pointnet_summary = None
    if args.pointnet and "pointnet" in done:
        print("[recipe] pointnet: done in an earlier sitting", flush=True)
        pointnet_summary = json.loads((out / "pointnet" / "summary.json").read_text())
    elif args.pointnet:
        from .pointnet import train_tiny_world_pointnet

        start = time.perf_counter()
        pointnet_summary = train_tiny_world_pointnet(
            out / "pointnet", num_train=args.pointnet_num_train, num_heldout=args.pointnet_num_heldout,
            steps=args.pointnet_steps, batch_size=args.pointnet_batch_size, head_steps=args.pointnet_head_steps,
            width_mult=args.pointnet_width_mult,
            # The data set's seed: its held-out split, and one feature extractor for runs that compare training seeds.
            seed=args.seed if args.data_seed is None else args.data_seed)
        print(f"[recipe] PointNet++ held-out family accuracy {pointnet_summary['heldout_accuracy']:.0%} "
              f"(majority share {pointnet_summary['majority_share']:.0%})", flush=True)
        phase("pointnet", start)

    trained = [name for name, weight in (config.get("tasks") or {}).items()
               if weight and (args.images or name not in IMAGE_TASKS)]
    summary = {"device": describe_device(device), "batch_scale": args.batch_scale, "compile": args.compile,
               "timings": timings, "vae": {k: vae_metrics.get(k) for k in ("augment", "train", "heldout", "timings")},
               "tasks": ", ".join(TASK_NAMES.get(name, name) for name in trained),
               "stages": [{k: r[k] for k in ("stage", "num_shape_tokens", "train_loss")} for r in results],
               "pipeline": str(out / "pipeline"),
               "pointnet": pointnet_summary and {k: pointnet_summary[k] for k in ("heldout_accuracy", "majority_share",
                                                                                   "num_heldout")},
               "pipeline_mb": round(sum(f.stat().st_size for f in (out / "pipeline").rglob("*") if f.is_file()) / 2**20,
                                    2)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_model_card(out / "pipeline", summary)
    print(f"[recipe] pipeline saved to {out / 'pipeline'} ({summary['pipeline_mb']} MB); try\n"
          f"  cgmllm generate \"a tall cylinder\" -o out.glb --model {out / 'pipeline'}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cgmllm.training.tiny_world.recipe",
                                     description="Tiny world: dataset -> ShapeVAE -> latents -> CG-MLLM stages -> "
                                     "pipeline folder, on a CPU or a GPU.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="cgmllm-train YAML of the CG-MLLM stages")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config entry (as cgmllm-train --set)")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-heldout", type=int, default=200)
    parser.add_argument("--no-images", dest="images", action="store_false",
                        help="no rendered views (the config's image tasks are then skipped)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild OUT/data even if it exists")
    parser.add_argument("--vae-steps", type=int, default=8000)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-width", type=int, default=64)
    parser.add_argument("--vae-batch-size", type=int, default=16)
    parser.add_argument("--vae-warmup", type=int, default=50, help="ShapeVAE learning-rate warm-up steps")
    parser.add_argument("--vae-stretch", type=float, default=2.0, help="train_vae --stretch (augmentation)")
    parser.add_argument("--vae-rotate", type=float, default=0.0, help="train_vae --rotate (augmentation)")
    parser.add_argument("--embed-dim", type=int, default=None,
                        help="ShapeVAE latent channels; sets the config's model.tiny.shape_latent_channels (default: "
                             "the config's value)")
    parser.add_argument("--num-near", type=int, default=2048)
    parser.add_argument("--num-uniform", type=int, default=2048)
    parser.add_argument("--queries-per-step", type=int, default=1024)
    parser.add_argument("--num-workers", type=int, default=None, help="processes for data building / sampling")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--device", default="cpu",
                        help="where the ShapeVAE, the latent cache and the stages run: cpu or cuda (a GPU chosen by "
                             "CUDA_VISIBLE_DEVICES); the data set is always built on the CPU")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the ShapeVAE loss and the CG-MLLM (same values as eager to rounding; "
                             "minutes of compilation on a CPU)")
    parser.add_argument("--batch-scale", type=int, default=1,
                        help="K times larger batches for K times fewer steps in every phase (the same samples)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the run: the ShapeVAE, the latent cache and the stages (the config's `seed`), "
                             "and of the data set unless --data-seed is given")
    parser.add_argument("--data-seed", type=int, default=None,
                        help="seed of the data set and its held-out split (default: --seed); fix it to compare "
                             "training seeds on one held-out split")
    parser.add_argument("--no-pointnet", dest="pointnet", action="store_false",
                        help="skip the PointNet++ (p-FID classifier) phase (it runs on the CPU, whatever --device)")
    parser.add_argument("--pointnet-num-train", type=int, default=480, help="PointNet++ training shapes")
    parser.add_argument("--pointnet-num-heldout", type=int, default=100, help="PointNet++ held-out shapes (accuracy)")
    parser.add_argument("--pointnet-steps", type=int, default=40, help="PointNet++ end-to-end steps")
    parser.add_argument("--pointnet-batch-size", type=int, default=8,
                        help="PointNet++ end-to-end batch size (the head phase uses twice it)")
    parser.add_argument("--pointnet-head-steps", type=int, default=400,
                        help="PointNet++ head steps on the frozen set-abstraction features")
    parser.add_argument("--pointnet-width-mult", type=int, default=2, help="PointNet++ width (Point-E's is 2)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out where it stopped (same arguments and config)")
    parser.add_argument("--vae-save-every", type=int, default=500, help="ShapeVAE checkpoint interval (steps)")
    parser.add_argument("--vae-stop-after", type=int, default=None,
                        help="end this sitting after this many more ShapeVAE steps (then --resume continues)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    return run_recipe(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
