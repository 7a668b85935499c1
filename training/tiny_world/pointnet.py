"""The tiny world's p-FID classifier: Point-E's PointNet++ (SSG, xyz, width 2) trained on the tiny world's families.

Point-E computes p-FID with a PointNet++ trained to classify ModelNet40; that checkpoint cannot be downloaded here,
and its features would mean little for the tiny world's primitives anyway. So the tiny world trains the same network
(`cgmllm.evaluation.PointNet2ClassifierSSG`, Point-E's parameter names and width) to tell its 10 families apart
(the 9 single-shape families and `composition`). It is the last phase of the tiny-world recipe
(`python -m cgmllm.training.tiny_world.recipe`), or alone:

    python -m cgmllm.training.tiny_world.pointnet --out checkpoints/tiny-world-pointnet [--steps 40 --num-train 480]

Two phases, sized for a few minutes to a quarter of an hour on one CPU core:
1. end to end (`train_pointnet`), with the recipe of the PointNet++ ModelNet40 classifier Point-E's was adapted from
   (yanx27/Pointnet_Pointnet2_pytorch: Adam, weight decay 1e-4, 1024 points, random point dropout, scale
   [0.8, 1.25] and shift [-0.1, 0.1]; each cloud normalised as Point-E normalises at evaluation), only far shorter;
2. the fully connected head on the frozen set-abstraction features of every training shape (`fit_classifier_head`):
   an end-to-end step costs seconds to a minute on a CPU core, a head step milliseconds.
It is saved in Point-E's layout, so `compute_pfid_pkid` and `cgmllm-eval generation --pointnet` load it as they
load Point-E's `pointnet.pt`, with a model card written from its `summary.json`.

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
from ...evaluation.point_cloud_metrics import normalize_point_clouds, point_e_batches, pointnet_features
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
    world after 40 steps: 7% held-out accuracy before, 37% after). The set-abstraction BatchNorms average over every
    grouped point (16 clouds x 512 centres x 32 neighbours per batch at the first level), so a few batches suffice.
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
                   seed: int = 0, log_every: int = 5, recalibration_clouds: int = 64
                   ) -> tuple[PointNet2ClassifierSSG, list[float]]:
    """Trains a PointNet++ classifier end to end on `clouds [M, N, 3]` (raw xyz, normalised here as at evaluation)
    with `labels [M]`; cosine-decayed Adam, batches drawn as shuffled epochs, then `recalibrate_batch_norm` on the
    first `recalibration_clouds` training clouds. Returns the model in eval mode and the per-step losses."""
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
    return recalibrate_batch_norm(model, clouds[:max(recalibration_clouds, batch_size)], batch_size, seed), losses


HEAD_MODULES = ("fc1", "bn1", "fc2", "bn2", "fc3")


@torch.no_grad()
def global_features(model: PointNet2ClassifierSSG, clouds: np.ndarray, chunk_size: int = 16) -> torch.Tensor:
    """The set-abstraction output `model.encode` `[M, 1024 * width_mult]` of raw clouds `[M, N, 3]` in eval mode,
    fed as the evaluation feeds them (`point_e_batches`)."""
    if model.training:
        raise ValueError("global_features needs the model in eval mode.")
    return torch.cat([model.encode(xyz, fps_start)
                      for xyz, fps_start in point_e_batches(model, clouds, chunk_size=chunk_size)])


def fit_classifier_head(model: PointNet2ClassifierSSG, features: torch.Tensor, labels: np.ndarray, *, steps: int = 300,
                        batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
                        log_every: int = 50) -> tuple[PointNet2ClassifierSSG, list[float]]:
    """Second phase: trains the fully connected head (`fc1 bn1 fc2 bn2 fc3`, the layers the p-FID features come
    out of) on `features [M, 1024 * width_mult]`, the frozen set-abstraction output of the training clouds
    (`global_features`), from the head's current weights, then recomputes `bn1` / `bn2` running statistics over all
    of them. Returns the model in eval mode and the per-step losses.

    Why: an end-to-end step costs ~10-60 s on one busy core (the second level's MLP alone runs on 16 x 128 x 64
    grouped points), so a few minutes buy a few dozen steps; the global features of every training cloud cost one
    forward pass each, after which a head step costs milliseconds. Measured on the tiny world: the classifier shipped
    before this phase existed (40 end-to-end steps) went from 37% to ~60% held-out accuracy with a head fitted on 320
    shapes; the shipped one (`train_tiny_world_pointnet` defaults) reaches 72%.
    """
    if len(features) != len(labels) or len(features) < batch_size:
        raise ValueError(f"{len(features)} feature rows, {len(labels)} labels, batch size {batch_size}: need one "
                         "label per row and at least one batch.")
    targets = torch.from_numpy(labels)
    head = [module for name, module in model.named_children() if name in HEAD_MODULES]
    parameters = [parameter for module in head for parameter in module.parameters()]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    order, losses = np.array([], dtype=np.int64), []
    with torch.enable_grad(), single_threaded_torch():
        model.requires_grad_(False)
        for parameter in parameters:
            parameter.requires_grad_(True)
        for module in head:
            module.train()
        for step in range(steps):
            if len(order) < batch_size:
                order = np.concatenate([order, rng.permutation(len(features))])
            batch, order = order[:batch_size], order[batch_size:]
            log_probs, _ = model.classify(features[batch])
            loss = F.nll_loss(log_probs, targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if log_every and (step % log_every == 0 or step == steps - 1):
                print(f"[pointnet head] step {step:4d}  loss {loss.item():.3f}", flush=True)
        model.requires_grad_(True)
        # Running statistics of the final head weights: a cumulative average over every training cloud.
        norms = [model.bn1, model.bn2]
        momenta = [norm.momentum for norm in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
        with torch.no_grad():
            for start in range(0, len(features) - batch_size + 1, batch_size):  # full batches (BatchNorm1d)
                model.classify(features[start : start + batch_size])
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
    return model.eval(), losses


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


def train_tiny_world_pointnet(out: str | Path, *, num_train: int = 480, num_heldout: int = 100, steps: int = 40,
                              batch_size: int = 8, lr: float = 2e-3, head_steps: int = 400, width_mult: int = 2,
                              seed: int = 0) -> dict:
    """Trains the tiny world's PointNet++ (`train_pointnet` end to end, then `fit_classifier_head`, batch
    `2 * batch_size`, on the frozen set-abstraction features of the same shapes), saves `out/pointnet.pt` (Point-E's
    layout), `out/summary.json` (settings, losses, train / held-out accuracy, majority share, wall times) and the
    model card (`write_pointnet_card`), and returns the summary. The shapes are the tiny world's `train` split, the
    accuracy is on its held-out `test` split (novel combinations included), both drawn by `make_tiny_world_specs`
    with `seed`."""
    timings = {}
    start = time.perf_counter()
    specs = make_tiny_world_specs(num_train=num_train, num_heldout=num_heldout, seed=seed)
    train_clouds, train_labels = family_clouds(specs["train"], seed=seed)
    test_clouds, test_labels = family_clouds(specs["test"], seed=seed + 10_000)
    timings["data"] = time.perf_counter() - start
    start = time.perf_counter()
    model, losses = train_pointnet(train_clouds, train_labels, len(FAMILY_NAMES), width_mult=width_mult, steps=steps,
                                   batch_size=batch_size, lr=lr, seed=seed)
    timings["end_to_end"] = time.perf_counter() - start
    start = time.perf_counter()
    features = global_features(model, train_clouds)
    timings["global_features"] = time.perf_counter() - start
    start = time.perf_counter()
    before = float((model.classify(features)[0].argmax(-1).numpy() == train_labels).mean())
    model, head_losses = fit_classifier_head(model, features, train_labels, steps=head_steps,
                                             batch_size=2 * batch_size, seed=seed)
    with torch.no_grad():
        train_accuracy = float((model.classify(features)[0].argmax(-1).numpy() == train_labels).mean())
    timings["head"] = time.perf_counter() - start
    start = time.perf_counter()
    heldout_accuracy = accuracy(model, test_clouds, test_labels)
    timings["heldout_accuracy"] = time.perf_counter() - start
    summary = {
        "classes": list(FAMILY_NAMES), "width_mult": width_mult, "num_train": num_train, "seed": seed,
        "train_points": TRAIN_POINTS,
        "end_to_end": {"steps": steps, "batch_size": batch_size, "lr": lr, "first_loss": losses[0],
                       "last_loss": float(np.mean(losses[-5:])), "train_accuracy": before},
        "head": {"steps": head_steps, "first_loss": head_losses[0] if head_losses else None,
                 "last_loss": float(np.mean(head_losses[-20:])) if head_losses else None},
        "train_accuracy": train_accuracy, "heldout_accuracy": heldout_accuracy, "num_heldout": len(test_labels),
        "majority_share": float(np.bincount(test_labels).max() / len(test_labels)),
        "seconds": {name: round(value, 1) for name, value in timings.items()},
        "threads": torch.get_num_threads(),
    }
    out = Path(out)
    save_pointnet(model, out / "pointnet.pt", FAMILY_NAMES)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_pointnet_card(out, summary)
    return summary


POINTNET_CARD = """---
license: apache-2.0
tags: [point-cloud, pointnet2, p-fid, cg-mllm, tiny-world]
---

# tiny-world PointNet++ (p-FID / p-KID feature extractor)

Point-E's p-FID classifier architecture (PointNet++ SSG, xyz only, width multiplier {width_mult}, {feature_dim}-d
`bn2(fc2(x))` features, Point-E's parameter names) trained to tell the tiny world's {num_classes} families apart
({classes}). It plays, for the tiny world, the part Point-E's ModelNet40 `pointnet.pt` plays for real shapes:
`cgmllm.evaluation.compute_pfid_pkid` and `cgmllm-eval generation --pointnet` load it with the same loader (Point-E's
container `{{"model_state_dict": ..., "class_names": [...]}}`, weights stored as float16).

```bash
cgmllm-eval generation --pred generated/ --ref heldout/ --pointnet pointnet.pt --kid-subset-size 40
python benchmarks/eval_tiny_world.py --num 40     # p-FID / p-KID rows next to the other tiny-world rows
```

## How it was trained

By the tiny-world recipe's `pointnet` phase (`python -m cgmllm.training.tiny_world.recipe`), or alone:
`python -m cgmllm.training.tiny_world.pointnet --out DIR --num-train {num_train} --steps {steps} --head-steps
{head_steps}` (seed {seed}, {threads} thread(s)). {num_train} shapes of the tiny world's `train` split, {train_points}
surface points each, normalised as Point-E normalises at evaluation.

1. End to end: {steps} steps of {batch_size} clouds, Adam (peak lr {lr:g}, cosine to 0, weight decay 1e-4), yanx27's
   ModelNet40 augmentation (point dropout, scale 0.8-1.25, shift 0.1); then every BatchNorm's running statistics are
   recomputed with the final weights (`recalibrate_batch_norm`).
2. Head: the set-abstraction output of every training shape is computed once (eval mode, as the evaluation feeds
   the network), and the fully connected head (`fc1 bn1 fc2 bn2 fc3`, where the p-FID features come from) trains
   {head_steps} steps of {head_batch} on it (Adam 1e-3); `bn1` / `bn2` statistics are then recomputed over all of
   them. An end-to-end step costs tens of seconds on a busy CPU core, a head step milliseconds.

| measured (`summary.json`) | value |
|---|---|
| end-to-end loss, first step -> mean of the last 5 | {e2e_first:.2f} -> {e2e_last:.2f} |
| training accuracy after the end-to-end phase / after the head ({num_train} shapes) | \
{e2e_accuracy:.0%} / {train_accuracy:.0%} |
| held-out family accuracy ({num_heldout} shapes of the `test` split, novel combinations included) | \
{heldout_accuracy:.0%} |
| majority-class share of those held-out shapes | {majority_share:.0%} |
| wall time (s): {timing_names} | {timing_values} |

p-FID / p-KID numbers computed with it are comparable with each other (same extractor, same protocol), not with
Point-E-based numbers in papers.
"""


def write_pointnet_card(folder: str | Path, summary: dict) -> Path:
    """`folder/README.md`: the model card of a tiny-world PointNet++, every number taken from `summary`."""
    e2e, head = summary["end_to_end"], summary["head"]
    text = POINTNET_CARD.format(
        **{**summary, "classes": ", ".join(summary["classes"])}, num_classes=len(summary["classes"]),
        feature_dim=256 * summary["width_mult"], steps=e2e["steps"], batch_size=e2e["batch_size"], lr=e2e["lr"],
        head_steps=head["steps"], head_batch=2 * e2e["batch_size"], e2e_first=e2e["first_loss"],
        e2e_last=e2e["last_loss"], e2e_accuracy=e2e["train_accuracy"],
        timing_names=" / ".join(summary["seconds"]).replace("_", " "),
        timing_values=" / ".join(f"{seconds:.0f}" for seconds in summary["seconds"].values()))
    path = Path(folder) / "README.md"
    path.write_text(text)
    return path


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for pointnet.pt and summary.json")
    parser.add_argument("--num-train", type=int, default=480, help="training shapes (train split)")
    parser.add_argument("--num-heldout", type=int, default=100, help="held-out shapes for the accuracy")
    parser.add_argument("--steps", type=int, default=40, help="end-to-end steps")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="end-to-end batch size (the head phase uses twice it)")
    parser.add_argument("--lr", type=float, default=2e-3,
                        help="end-to-end peak (cosine to 0); yanx27 uses 1e-3 over 200 epochs")
    parser.add_argument("--head-steps", type=int, default=400,
                        help="steps of the head on the frozen set-abstraction features (batch 2 * --batch-size, Adam 1e-3)")
    parser.add_argument("--width-mult", type=int, default=2, help="Point-E's is 2 (512-d features)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = train_tiny_world_pointnet(args.out, num_train=args.num_train, num_heldout=args.num_heldout,
                                        steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                        head_steps=args.head_steps, width_mult=args.width_mult, seed=args.seed)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
