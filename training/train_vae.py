"""Train a tiny ShapeVAE on the tiny world (or any folder of meshes) on the CPU.

    python -m cgmllm.training.train_vae --data TINY_WORLD_DIR --out OUT [--steps 2000 --num-latents 64 ...]

Every mesh is normalised to the VAE cube exactly as `mesh_utils.sample_vae_surface` does (so that the pipeline's
`encode_mesh` feeds the trained encoder what it saw in training), then sampled **once**: a surface point cloud (half
area-uniform, half on sharp edges: the `pc_size` / `pc_sharpedge_size` written into the VAE's config, which captioning
and the latent cache then draw) and occupancy-labelled query points
(`mesh_utils.sample_sdf_points`), with `--labels sdf` also their inside-positive signed distances
(`mesh_utils.signed_distance`, Hunyuan3D-2.1's supervision). The arrays are cached in `OUT/cache_<split>.npz`, so a
training step is only the VAE forward/backward (`ShapeVAE.compute_loss`) on a random subset of the cached queries.
At the end the VAE is saved to `OUT/vae` (`ShapeVAE.from_pretrained(OUT / "vae")`) and the held-out reconstruction
IoU to `OUT/metrics.json`.

Where it runs: `--device cuda` trains on a GPU (the data stays in host memory; each step's batch is copied over),
`--device cpu` (the default) on the CPU. The random streams (batches, queries, augmentation, FPS starts, posterior
noise) are drawn on the CPU in both cases, so a GPU run sees the same samples as a CPU run; its floating-point results
differ only by the device's arithmetic. `--compile` runs the loss computation through `torch.compile` (inductor): the
same loss and gradients as eager to rounding (a test checks one step), fewer and larger kernels per step.

Long runs in several sittings: every `--save-every` steps the whole training state (weights, optimizer, schedule,
both random streams, history) goes to `OUT/checkpoint/state.pt`, written to a temporary folder and renamed, so a kill
at any moment leaves the previous checkpoint usable. `--resume` continues from it and ends with exactly the weights
of an uninterrupted run; `--stop-after K` ends a sitting after K more steps (with a checkpoint). A run with other
training arguments than the checkpoint's is refused, naming them.
"""

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


MESH_SUFFIXES = (".ply", ".glb", ".obj", ".stl", ".off", ".gltf")


def find_meshes(folder: str | Path, split: str | None = None) -> list[Path]:
    """Mesh files of a tiny-world split (`folder/<split>/meshes/*`) or, without that layout, of `folder` itself."""
    folder = Path(folder)
    for candidate in ([folder / split / "meshes", folder / split] if split else []) + [folder]:
        if candidate.is_dir():
            files = sorted(p for p in candidate.iterdir() if p.suffix.lower() in MESH_SUFFIXES)
            if files:
                return files
    return []


def _sample_one(job):
    from cgmllm.mesh_utils import load_mesh, normalize_mesh, sample_sdf_points, sample_surface, signed_distance

    path, num_points, num_near, num_uniform, seed, sharp_fraction, with_distances = job
    mesh = normalize_mesh(load_mesh(path))[0]
    num_sharp = num_points // 2  # the split `build_vae` writes into the config (pc_size / pc_sharpedge_size)
    surface = sample_surface(mesh, num_points - num_sharp, num_sharp, seed=seed)
    points, labels = sample_sdf_points(mesh, num_near=num_near, num_uniform=num_uniform, seed=seed + 1,
                                       sharp_fraction=sharp_fraction)
    sample = {"surface": surface, "points": points, "labels": labels}
    if with_distances:
        sample["distances"], sample["directions"] = signed_distance(mesh, points, labels, seed=seed + 2)
    return sample


def precompute_samples(
    files: Sequence[Path],
    cache_path: str | Path | None,
    num_points: int,
    num_near: int,
    num_uniform: int,
    seed: int = 0,
    num_workers: int = 0,
    sharp_fraction: float = 0.0,
    with_distances: bool = False,
) -> dict[str, np.ndarray]:
    """Surface clouds `surface` `(M, P, 7)`, query points `points` `(M, Q, 3)` and occupancies `labels` `(M, Q)` of
    every mesh, with `with_distances` also signed distances `distances` `(M, Q)` and their directions `directions`
    `(M, Q, 3)` (`mesh_utils.signed_distance`); read from `cache_path` when it holds the same files and sizes,
    else computed (in `num_workers` processes) and written."""
    key = {"files": [str(f) for f in files], "num_points": num_points, "num_near": num_near,
           "num_uniform": num_uniform, "seed": seed}
    if sharp_fraction:  # (older caches have no such keys)
        key["sharp_fraction"] = sharp_fraction
    if with_distances:
        key["distances"] = True
    names = ("surface", "points", "labels") + (("distances", "directions") if with_distances else ())
    if cache_path is not None and Path(cache_path).is_file():
        cached = np.load(cache_path, allow_pickle=False)
        if json.loads(str(cached["key"])) == key:
            return {name: cached[name] for name in names}
    jobs = [(str(f), num_points, num_near, num_uniform, seed * 1_000_003 + 2 * i, sharp_fraction, with_distances)
            for i, f in enumerate(files)]
    if num_workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=num_workers) as pool:
            results = list(pool.map(_sample_one, jobs, chunksize=8))
    else:
        results = [_sample_one(job) for job in jobs]
    arrays = {name: np.stack([r[name] for r in results]).astype(np.float32) for name in names}
    if cache_path is not None:
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache_path, key=np.array(json.dumps(key)), **arrays)
    return arrays


def random_rotations(count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` rotation matrices `(count, 3, 3)`, uniform on SO(3) (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(count, 3, 3)))
    q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]  # unique Q with a positive diagonal of R: Haar
    q[np.linalg.det(q) < 0, :, 0] *= -1  # reflections -> rotations
    return q


def augment_samples(surface: np.ndarray, points: np.ndarray, rng: np.random.Generator, max_stretch: float = 1.0,
                    rotate: float = 0.0, scale: float = 0.9999, distances: np.ndarray | None = None,
                    directions: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Augment cached samples by a random per-axis stretch and/or rotation, then re-normalise them to the VAE cube.

    `surface` `(B, P, 7)` (xyz, normal, sharp flag) and `points` `(B, Q, 3)` are stretched by `s ~ exp(U(-log a, log
    a))` per axis and mesh (`a = max_stretch`), then, with probability `rotate`, rotated by a uniformly random `R`:
    in all `x -> R (s * x)`. Normals follow the inverse transpose, `n -> R (n / s)`, re-normalised. Occupancy is
    unchanged by any invertible affine map, so the cached labels stay right. Afterwards the surface's bounding box is
    centred and its longest side scaled to `2 * scale`, as `normalize_mesh` does for the processor.

    Signed distances are not invariant: given `distances` `(B, Q)` and their `directions` `(B, Q, 3)` (from
    `mesh_utils.signed_distance`), a third array returns them mapped as `d -> d / |A^-T u| * f` (`A = R diag(s)`,
    `f` the re-normalisation factor, `u` the direction): the distance to the image of the plane the closest point
    lies in. Exact where that face stays the closest one, as for most points of a stretched box; an overestimate
    where the stretch brings another part closer (deep inside) and first order at edges and curved parts. Near the
    surface, where the field is clamped least, it is accurate; the sign, which alone fixes the surface, is exact.

    This turns the few proportions and poses of a small training set (e.g. regular and tall boxes, upright or lying)
    into a continuum (flat, long, tilted ... boxes) without touching held-out data: the VAE then reconstructs
    geometry it never saw instead of snapping to the nearest training shape.
    """
    if max_stretch < 1.0:
        raise ValueError(f"max_stretch must be >= 1 (1 = no stretch), got {max_stretch}.")
    if not 0.0 <= rotate <= 1.0:
        raise ValueError(f"rotate is a probability in [0, 1], got {rotate}.")
    if (distances is None) != (directions is None):
        raise ValueError("augment_samples needs both distances and directions, or neither.")
    if max_stretch == 1.0 and rotate == 0.0:
        return (surface, points) if distances is None else (surface, points, distances)
    batch = surface.shape[0]
    linear = np.tile(np.eye(3), (batch, 1, 1))  # (B, 3, 3): x' = x @ linear^T
    if max_stretch > 1.0:
        log_a = np.log(max_stretch)
        linear = linear * np.exp(rng.uniform(-log_a, log_a, size=(batch, 1, 3)))  # diag(s)
    if rotate > 0.0:
        rotated = rng.random(batch) < rotate
        linear[rotated] = random_rotations(int(rotated.sum()), rng) @ linear[rotated]
    linear = linear.astype(np.float32)
    xyz = surface[..., :3] @ linear.transpose(0, 2, 1)
    inverse = np.linalg.inv(linear)
    normals = surface[..., 3:6] @ inverse  # n^T A^-1 = (A^-T n)^T
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True).clip(min=1e-8)
    low, high = xyz.min(axis=1, keepdims=True), xyz.max(axis=1, keepdims=True)  # (B, 1, 3)
    center = (low + high) / 2
    factor = 2 * scale / (high - low).max(axis=-1, keepdims=True)  # (B, 1, 1)
    surface = np.concatenate([(xyz - center) * factor, normals, surface[..., 6:]], axis=-1)
    points = (points @ linear.transpose(0, 2, 1) - center) * factor
    if distances is None:
        return surface.astype(np.float32), points.astype(np.float32)
    distances = distances / np.linalg.norm(directions @ inverse, axis=-1).clip(min=1e-8) * factor[..., 0]
    return surface.astype(np.float32), points.astype(np.float32), distances.astype(np.float32)


def build_vae(num_latents: int, embed_dim: int, width: int, heads: int, encoder_layers: int, decoder_layers: int,
              num_points: int, downsample_ratio: int, num_freqs: int = 8, init_logvar: float | None = -6.0):
    """A fresh ShapeVAE for training from scratch.

    `init_logvar` sets the initial log-variance of the posterior (the `pre_kl` bias of its second half). With the
    default PyTorch init the posterior starts at std ~1, so early decoder inputs are mostly noise and the mean they
    are evaluated at differs from what was trained on: on 16 tiny-world shapes, 300 full-batch steps reach a volume
    IoU of 0.45 from std 1 and 0.85 from std e^-3 (the KL term still regularises the posterior afterwards).
    """
    from cgmllm.modeling_shape_vae import ShapeVAE

    num_sharp = num_points // 2
    vae = ShapeVAE(num_latents=num_latents, embed_dim=embed_dim, width=width, heads=heads,
                   num_encoder_layers=encoder_layers, num_decoder_layers=decoder_layers, num_freqs=num_freqs,
                   pc_size=num_points - num_sharp, pc_sharpedge_size=num_sharp, downsample_ratio=downsample_ratio,
                   scale_factor=1.0)
    if init_logvar is not None:
        with torch.no_grad():
            vae.pre_kl.bias[embed_dim:] = init_logvar
    return vae


def _loss_targets(data: dict[str, np.ndarray], rows, sdf_truncation: float | None, sdf_loss: str,
                  distances: np.ndarray | None = None) -> dict:
    """`compute_loss` label arguments: occupancy, or signed distances in units of the truncation, clamped to 1."""
    if sdf_truncation is None:
        return {"query_labels": data["labels"][rows]}
    distances = data["distances"][rows] if distances is None else distances
    return {"query_labels": distances / sdf_truncation, "label_type": "sdf", "sdf_clamp": 1.0, "sdf_loss": sdf_loss}


@torch.no_grad()
def evaluate_iou(vae, data: dict[str, np.ndarray], num_latents: int, num_uniform: int, batch_size: int = 8,
                 seed: int = 0, sdf_truncation: float | None = None, sdf_loss: str = "l1") -> dict[str, float]:
    """Reconstruction IoU (posterior mean, field > 0 vs occupancy) on the uniform volume queries (`iou`) and on
    all queries (`iou_all`), averaged over meshes, plus the mean reconstruction loss: BCE, or with
    `sdf_truncation` the training's SDF loss on `data["distances"] / sdf_truncation`."""
    vae.eval()
    ious, ious_all, losses = [], [], []
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(data["surface"]), batch_size):
        sl = slice(start, start + batch_size)
        targets = _loss_targets(data, sl, sdf_truncation, sdf_loss)
        out = vae.compute_loss(data["surface"][sl], data["points"][sl], **targets, num_latents=num_latents,
                               generator=generator, sample_posterior=False)
        losses.append(float(out.recon_loss) * out.logits.shape[0])
        predicted = (out.logits > 0).cpu().numpy()
        truth = data["labels"][sl] > 0.5
        for pred, gt, name in ((predicted[:, -num_uniform:], truth[:, -num_uniform:], ious), (predicted, truth, ious_all)):
            inter = (pred & gt).sum(1)
            union = (pred | gt).sum(1)
            name.extend(np.where(union > 0, inter / np.maximum(union, 1), 1.0).tolist())
    count = len(data["surface"])
    return {"iou": float(np.mean(ious)), "iou_all": float(np.mean(ious_all)), "recon_loss": sum(losses) / count}


CHECKPOINT_DIR = "checkpoint"
# Arguments that may differ between the sittings of one run (they do not change what is computed).
_SITTING_ARGS = ("resume", "stop_after", "save_every", "threads", "log_every", "num_workers")


def _run_key(args) -> dict:
    return {name: value for name, value in sorted(vars(args).items()) if name not in _SITTING_ARGS}


def differing_run_arguments(saved: dict, current: dict, parser: argparse.ArgumentParser) -> list[str]:
    """The names whose value in `saved` (a run key written by an earlier sitting) differs from `current`. An argument
    the saved key lacks was added to the command after that run started: it counts as its default, which is what
    the older command did, so such a run resumes unless the new argument is set to something else."""
    return sorted(name for name in set(saved) | set(current)
                  if saved.get(name, parser.get_default(name)) != current.get(name, parser.get_default(name)))


def save_training_state(out: Path, state: dict):
    """Write `state` to `out/checkpoint/state.pt` atomically: a temporary folder, then a rename over the old one."""
    final, temporary = out / CHECKPOINT_DIR, out / (CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    torch.save(state, temporary / "state.pt")
    old = out / (CHECKPOINT_DIR + ".old")
    if final.exists():  # (else `old` may be the only complete checkpoint: keep it until `final` is in place)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(temporary, final)
    shutil.rmtree(old, ignore_errors=True)


def load_training_state(out: Path, args) -> dict | None:
    """The checkpoint of an earlier sitting of this run (`None` when there is none), checked against `args`."""
    path = out / CHECKPOINT_DIR / "state.pt"
    if not path.is_file():
        old = out / (CHECKPOINT_DIR + ".old") / "state.pt"  # a kill between the two renames of save_training_state
        path = old if old.is_file() else path
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: numpy RNG state is a dict
    saved, current, parser = state["run_key"], _run_key(args), build_parser()
    differing = differing_run_arguments(saved, current, parser)
    if differing:
        details = ", ".join(f"--{name.replace('_', '-')} {saved.get(name, parser.get_default(name))!r} "
                            f"(now {current.get(name)!r})" for name in differing)
        raise ValueError(f"{path} was written by a run with other arguments: {details}. Resume with the same "
                         "arguments, or train into a new --out.")
    return state


def train_vae(args) -> dict:
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after must be at least 1 step, got {args.stop_after}.")
    if args.save_every < 0:
        raise ValueError(f"--save-every must be >= 0 (0: only when stopping early), got {args.save_every}.")
    from .devices import describe_device, resolve_device

    device = resolve_device(args.device)  # before any work: a missing GPU is an error now, not after precompute
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    num_points = args.num_points or args.num_latents * args.downsample_ratio
    train_files = find_meshes(args.data, "train")[: args.max_train or None]
    eval_files = find_meshes(args.data, "test")[: args.max_eval or None]
    if not train_files:
        raise ValueError(f"No meshes found in {args.data} (expected {args.data}/train/meshes/*.ply or mesh files).")
    if eval_files == train_files or not (Path(args.data) / "test").is_dir():
        eval_files = []

    timings = {}
    start = time.perf_counter()
    sdf = args.labels == "sdf"
    truncation = args.sdf_truncation if sdf else None
    train = precompute_samples(train_files, out / "cache_train.npz", num_points, args.num_near, args.num_uniform,
                               args.seed, args.num_workers, args.sharp_near, with_distances=sdf)
    held = (precompute_samples(eval_files, out / "cache_test.npz", num_points, args.num_near, args.num_uniform,
                               args.seed + 1, args.num_workers, with_distances=sdf) if eval_files else None)
    timings["precompute_s"] = time.perf_counter() - start
    print(f"precomputed {len(train_files)} train + {len(eval_files)} held-out meshes in {timings['precompute_s']:.1f}s")

    torch.manual_seed(args.seed)
    vae = build_vae(args.num_latents, args.embed_dim, args.width, args.heads, args.encoder_layers,
                    args.decoder_layers, num_points, args.downsample_ratio, args.num_freqs, args.init_logvar)
    vae = vae.to(device).train()  # (initialised on the CPU: the same initial weights on every device)
    print(f"ShapeVAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, {args.num_latents} latents, "
          f"on {describe_device(device)}{', compiled' if args.compile else ''}")
    compute_loss = torch.compile(vae.compute_loss) if args.compile else vae.compute_loss
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, args.warmup)) * (
            0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, step / max(1, args.steps))))))
    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    num_meshes, total_queries = train["points"].shape[:2]
    step_times, history, first_step = [], [], 0
    if args.resume:
        state = load_training_state(out, args)
        if state is None:
            print(f"--resume: no checkpoint in {out / CHECKPOINT_DIR}; starting at step 0")
        else:
            vae.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            rng.bit_generator.state = state["numpy_rng"]
            generator.set_state(state["torch_generator"])
            history, first_step = state["history"], state["step"]
            timings["train_s_before_resume"] = state["train_s"]
            print(f"resumed from {out / CHECKPOINT_DIR} at step {first_step}")
    elif (out / CHECKPOINT_DIR).exists() or (out / (CHECKPOINT_DIR + ".old")).exists():
        raise ValueError(f"{out} holds a checkpoint of an earlier run ({out / CHECKPOINT_DIR}); pass --resume to "
                         "continue it, or train into a new --out.")
    last_step = args.steps if args.stop_after is None else min(args.steps, first_step + args.stop_after)

    def checkpoint(step):
        save_training_state(out, {
            "run_key": _run_key(args), "step": step, "model": vae.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "numpy_rng": rng.bit_generator.state,
            "torch_generator": generator.get_state(), "history": history,
            "train_s": timings.get("train_s_before_resume", 0.0) + float(sum(step_times)),
        })

    for step in range(first_step, last_step):
        tick = time.perf_counter()
        index = rng.choice(num_meshes, size=min(args.batch_size, num_meshes), replace=False)
        queries = rng.choice(total_queries, size=min(args.queries_per_step, total_queries), replace=False)
        # Train on a random number of latents in [min, max] so the encoder serves every stage resolution.
        num_latents = int(rng.integers(args.min_latents or args.num_latents, args.num_latents + 1))
        rows = (index[:, None], queries[None, :])
        field = {"distances": train["distances"][rows], "directions": train["directions"][rows]} if sdf else {}
        # `mapped` is [distances through the augmentation] with SDF labels, else empty.
        surface, points, *mapped = augment_samples(train["surface"][index], train["points"][rows], rng, args.stretch,
                                                   args.rotate, **field)
        targets = _loss_targets(train, rows, truncation, args.sdf_loss, *mapped)
        targets["query_labels"] = torch.from_numpy(np.ascontiguousarray(targets["query_labels"])).to(device)
        loss = compute_loss(torch.from_numpy(surface).to(device), torch.from_numpy(points).to(device), **targets,
                            kl_weight=args.kl_weight, num_latents=num_latents, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step_times.append(time.perf_counter() - tick)
        if step % args.log_every == 0 or step == args.steps - 1:
            history.append({"step": step, "recon_loss": loss.recon_loss.item(), "kl": loss.kl_loss.item()})
            print(f"step {step:5d}  recon {loss.recon_loss.item():.4f}  kl {loss.kl_loss.item():.3f}  "
                  f"{np.mean(step_times[-args.log_every:]):.3f}s/step")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            checkpoint(step + 1)
    if last_step < args.steps:
        checkpoint(last_step)
        print(f"stopped after step {last_step} of {args.steps} (--stop-after); continue with --resume")
        return {"stopped_at": last_step, "steps": args.steps}
    timings["train_s"] = timings.pop("train_s_before_resume", 0.0) + float(sum(step_times))
    timings["step_s"] = float(np.mean(step_times[1:] if len(step_times) > 1 else step_times))

    metrics = {"labels": args.labels, "device": describe_device(device), "compiled": args.compile,
               "num_train": len(train_files), "num_heldout": len(eval_files),
               "steps": args.steps, "num_latents": args.num_latents, "num_points": num_points,
               "augment": {"stretch": args.stretch, "rotate": args.rotate}, "timings": timings,
               "history": history, "parameters": sum(p.numel() for p in vae.parameters())}
    for name, data in (("train", train), ("heldout", held)):
        if data is not None:
            limit = args.max_train_eval if name == "train" else None  # held-out is already capped by --max-eval
            subset = {k: v[: limit or None] for k, v in data.items()}
            metrics[name] = evaluate_iou(vae, subset, args.num_latents, args.num_uniform, seed=args.seed,
                                         sdf_truncation=truncation, sdf_loss=args.sdf_loss)
            print(f"{name}: IoU {metrics[name]['iou']:.3f} (all queries {metrics[name]['iou_all']:.3f})")
    vae.to("cpu").eval().save_pretrained(out / "vae")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    for folder in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):  # finished: the saved VAE and metrics replace them
        shutil.rmtree(out / folder, ignore_errors=True)
    return metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a tiny ShapeVAE on the tiny world (CPU).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", required=True, help="tiny world folder (build_tiny_world_dataset) or mesh folder")
    parser.add_argument("--out", required=True, help="output folder: vae/, metrics.json, cache_*.npz")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--kl-weight", type=float, default=1e-3)
    parser.add_argument("--num-latents", type=int, default=64, help="latent rows N (the largest stage resolution)")
    parser.add_argument("--min-latents", type=int, default=16, help="train on N drawn in [min, num-latents]")
    parser.add_argument("--embed-dim", type=int, default=8, help="latent channels C")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--encoder-layers", type=int, default=1)
    parser.add_argument("--decoder-layers", type=int, default=2)
    parser.add_argument("--init-logvar", type=float, default=-6.0,
                        help="initial posterior log-variance (see build_vae); the PyTorch default init is ~0")
    parser.add_argument("--stretch", type=float, default=1.0,
                        help="augment: random per-axis stretch up to this factor (see augment_samples); 1 = off")
    parser.add_argument("--rotate", type=float, default=0.0,
                        help="augment: probability of a uniformly random rotation per sample (see augment_samples)")
    parser.add_argument("--num-freqs", type=int, default=8, help="Fourier frequencies of the point embedding")
    parser.add_argument("--downsample-ratio", type=int, default=8, help="surface points per latent")
    parser.add_argument("--num-points", type=int, default=None, help="surface points per mesh; default N * ratio")
    parser.add_argument("--num-near", type=int, default=2048, help="near-surface queries cached per mesh")
    parser.add_argument("--num-uniform", type=int, default=2048, help="uniform volume queries cached per mesh")
    parser.add_argument("--sharp-near", type=float, default=0.0,
                        help="share of the near-surface training queries seeded on sharp edges (sample_sdf_points)")
    parser.add_argument("--labels", choices=("occupancy", "sdf"), default="occupancy",
                        help="supervision: occupancy with BCE, or signed distance (Hunyuan3D-2.1's) divided by "
                             "--sdf-truncation, clamped to [-1, 1] (DeepSDF) and regressed with --sdf-loss")
    parser.add_argument("--sdf-truncation", type=float, default=0.05,
                        help="distance (VAE cube units) at which the SDF label saturates; the field is in these units")
    parser.add_argument("--sdf-loss", choices=("l1", "mse"), default="l1")
    parser.add_argument("--queries-per-step", type=int, default=1024, help="queries per mesh in one step")
    parser.add_argument("--max-train", type=int, default=None, help="use only the first N training meshes")
    parser.add_argument("--max-eval", type=int, default=None, help="use only the first N held-out meshes")
    parser.add_argument("--max-train-eval", type=int, default=200, help="training meshes in the train IoU")
    parser.add_argument("--num-workers", type=int, default=0, help="processes for the precomputation")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--device", default="cpu",
                        help="where to train: cpu, cuda or cuda:N (a clear error where it is not available)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the loss computation (inductor; same values as eager to rounding)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=500,
                        help="write OUT/checkpoint every this many steps (0: only when stopping early)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (same arguments)")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="end this sitting after this many more steps, with a checkpoint; --resume continues")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    return train_vae(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
