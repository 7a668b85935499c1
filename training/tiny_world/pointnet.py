"""The tiny world's p-FID classifier: Point-E's PointNet++ (SSG, xyz, width 2) trained on the tiny world's families.

Point-E computes p-FID with a PointNet++ trained to classify ModelNet40; that checkpoint cannot be downloaded here,
and its features would mean little for the tiny world's primitives anyway. So the tiny world trains the same network
(`cgmllm.evaluation.PointNet2ClassifierSSG`, Point-E's parameter names and width) to tell its 10 families apart
(the 9 single-shape families and `composition`), with the recipe of the PointNet++ ModelNet40 classifier Point-E's
was adapted from (yanx27/Pointnet_Pointnet2_pytorch: Adam 1e-3, weight decay 1e-4, 1024 points, random point
dropout, scale [0.8, 1.25] and shift [-0.1, 0.1]; each cloud normalised as Point-E normalises at evaluation), only
far shorter. It is saved in Point-E's layout, so `compute_pfid_pkid` and `cgmllm-eval generation --pointnet` load it
as they load Point-E's `pointnet.pt`:

    python -m cgmllm.training.tiny_world.pointnet --out checkpoints/tiny-world-pointnet [--steps 40 --num-train 320]

The shapes come from the tiny world's `train` split (`make_tiny_world_specs`, the recipe's seed); the accuracy in
the model card is measured on single shapes and compositions of the held-out `test` split.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...evaluation.modeling_pointnet2 import PointNet2ClassifierSSG
from ...evaluation.point_cloud_metrics import normalize_point_clouds, pointnet_features
from ...mesh_utils import sample_uniform_surface, single_threaded_torch
from .families import FAMILY_NAMES
from .split import make_tiny_world_specs


#: Points per training cloud (ModelNet40 training uses 1024).
TRAIN_POINTS = 1024


def family_clouds(specs, num_points: int = TRAIN_POINTS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Surface clouds `[len(specs), num_points, 3]` float32 of the specs' meshes and their family labels (index in
    `FAMILY_NAMES`)."""
    clouds = np.stack([sample_uniform_surface(spec.to_mesh(), num_points, seed=seed + i)[0]
                       for i, spec in enumerate(specs)]).astype(np.float32)
    labels = np.array([FAMILY_NAMES.index(spec.family) for spec in specs], dtype=np.int64)
    return clouds, labels


def augment(clouds: np.ndarray, rng: np.random.Generator, max_dropout: float = 0.875) -> np.ndarray:
    """yanx27's ModelNet40 augmentation of normalised clouds `[B, N, 3]`: drop a random share of points (replaced
    by the first point), scale by U(0.8, 1.25) and shift by U(-0.1, 0.1) per cloud."""
    clouds = clouds.copy()
    for cloud in clouds:
        dropped = rng.random(len(cloud)) <= rng.random() * max_dropout
        cloud[dropped] = cloud[0]
    clouds *= rng.uniform(0.8, 1.25, size=(len(clouds), 1, 1)).astype(clouds.dtype)
    clouds += rng.uniform(-0.1, 0.1, size=(len(clouds), 1, 3)).astype(clouds.dtype)
    return clouds


def recalibrate_batch_norm(model: PointNet2ClassifierSSG, clouds: np.ndarray, batch_size: int = 16,
                           seed: int = 0) -> PointNet2ClassifierSSG:
    """Recomputes every BatchNorm's running statistics as the plain average over `clouds` (normalised, not
    augmented) with the final weights (`torch.optim.swa_utils.update_bn`), and returns the model in eval mode.

    Needed after a short run: the running statistics are a moving average (momentum 0.1) over weights that changed
    at every step, so in eval mode the network sees statistics of weights it no longer has (measured on the tiny
    world after 40 steps: 7% held-out accuracy before, see the model card for after).
    """
    torch.manual_seed(seed)
    normalised = normalize_point_clouds(clouds)
    batches = [torch.from_numpy(normalised[i : i + batch_size]).transpose(1, 2)
               for i in range(0, len(normalised) - batch_size + 1, batch_size)]
    with single_threaded_torch():
        torch.optim.swa_utils.update_bn(batches, model)
    return model.eval()


def train_pointnet(clouds: np.ndarray, labels: np.ndarray, num_classes: int, *, width_mult: int = 2,
                   steps: int = 40, batch_size: int = 16, lr: float = 1e-3, weight_decay: float = 1e-4,
                   seed: int = 0, log_every: int = 5) -> tuple[PointNet2ClassifierSSG, list[float]]:
    """Trains a PointNet++ classifier on `clouds [M, N, 3]` (raw xyz, normalised here as at evaluation) with
    `labels [M]`; cosine-decayed Adam, batches drawn as shuffled epochs, then `recalibrate_batch_norm` on the
    training clouds. Returns the model in eval mode and the per-step losses."""
    if len(clouds) != len(labels) or len(clouds) < batch_size:
        raise ValueError(f"{len(clouds)} clouds, {len(labels)} labels, batch size {batch_size}: need one label per "
                         "cloud and at least one batch.")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    normalised = normalize_point_clouds(clouds)
    model = PointNet2ClassifierSSG(num_classes=num_classes, width_mult=width_mult).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    order, losses = np.array([], dtype=np.int64), []
    start = time.perf_counter()
    with single_threaded_torch():
        for step in range(steps):
            if len(order) < batch_size:
                order = np.concatenate([order, rng.permutation(len(clouds))])
            batch, order = order[:batch_size], order[batch_size:]
            xyz = torch.from_numpy(augment(normalised[batch], rng)).transpose(1, 2)
            log_probs, _ = model(xyz)
            loss = F.nll_loss(log_probs, torch.from_numpy(labels[batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if log_every and (step % log_every == 0 or step == steps - 1):
                accuracy = (log_probs.argmax(-1).numpy() == labels[batch]).mean()
                print(f"[pointnet] step {step:4d}  loss {loss.item():.3f}  batch accuracy {accuracy:.0%}  "
                      f"{time.perf_counter() - start:.0f}s", flush=True)
    return recalibrate_batch_norm(model, clouds, batch_size, seed), losses


def save_pointnet(model: PointNet2ClassifierSSG, path: str | Path, class_names: Sequence[str] = (),
                  half: bool = True) -> Path:
    """Saves `{"model_state_dict": ..., "class_names": [...]}` (Point-E's container; `load_pointnet` reads it).
    `half` stores floating tensors as float16 (half the file; loaded back into float32)."""
    state = {key: value.half() if half and value.is_floating_point() else value
             for key, value in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state_dict": state, "class_names": list(class_names)}, path)
    return path


def accuracy(model: PointNet2ClassifierSSG, clouds: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in eval mode, clouds fed as the evaluation feeds them."""
    _, probabilities = pointnet_features(model, clouds)
    return float((probabilities.argmax(-1) == labels).mean())


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for pointnet.pt and summary.json")
    parser.add_argument("--num-train", type=int, default=320, help="training shapes (train split)")
    parser.add_argument("--num-heldout", type=int, default=100, help="held-out shapes for the accuracy")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak (cosine to 0); yanx27 uses 1e-3 over 200 epochs")
    parser.add_argument("--width-mult", type=int, default=2, help="Point-E's is 2 (512-d features)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    specs = make_tiny_world_specs(num_train=args.num_train, num_heldout=args.num_heldout, seed=args.seed)
    train_clouds, train_labels = family_clouds(specs["train"], seed=args.seed)
    test_clouds, test_labels = family_clouds(specs["test"], seed=args.seed + 10_000)
    data_seconds = time.perf_counter() - start
    start = time.perf_counter()
    model, losses = train_pointnet(train_clouds, train_labels, len(FAMILY_NAMES), width_mult=args.width_mult,
                                   steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    train_seconds = time.perf_counter() - start
    summary = {
        "classes": list(FAMILY_NAMES), "width_mult": args.width_mult, "steps": args.steps,
        "batch_size": args.batch_size, "lr": args.lr, "num_train": args.num_train, "seed": args.seed,
        "train_points": TRAIN_POINTS, "first_loss": losses[0], "last_loss": float(np.mean(losses[-5:])),
        "train_accuracy": accuracy(model, train_clouds[:100], train_labels[:100]),
        "heldout_accuracy": accuracy(model, test_clouds, test_labels), "num_heldout": len(test_labels),
        "chance": float(np.bincount(test_labels).max() / len(test_labels)),
        "seconds": {"data": round(data_seconds, 1), "train": round(train_seconds, 1)},
        "threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    save_pointnet(model, out / "pointnet.pt", FAMILY_NAMES)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
