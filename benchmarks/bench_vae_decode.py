"""Dense vs hierarchical volume decoding: field queries, wall time, and whether the meshes are identical.

Two fields, both positive inside and meshed at level 0:

* `vae`: a tiny ShapeVAE (width 32, 4 heads, 128 latents) fitted for a few hundred steps to the real `nut.ply` mesh
  with `ShapeVAE.compute_loss`, so that its 0-level is an actual surface and each query costs a real geometry-decoder
  cross-attention. This is the case the hierarchical decoder is for: query cost dominates.
* `analytic`: a wavy ellipsoid pierced by a thin disc (pure torch, ~free per query), which isolates the
  bookkeeping overhead of the hierarchical decoder.

It also times pure-torch farthest point sampling at the released encoder size (81,920 -> 4,096 points).

Two comparisons of the hierarchical extraction (decoder + marching cubes) run instead of that, on these fields or on
`shipped`: the shipped checkpoint's (`checkpoints/tiny-world`) generation of "a tall cylinder" (seed 0).

* `--baseline REV`: this checkout against `modeling_cgmllm/volume_decoding.py` as it was at git revision REV,
  alternating the two in one process for `--rounds` rounds, and whether both give the same grid and mesh, bit for
  bit. Times are split into the field's calls, the decoder's own bookkeeping and marching cubes.
* `--chunk-sizes N ...`: this checkout at each number of points per field call, and whether the grids are
  bit-identical across the sizes.

Both report process CPU seconds: on a shared machine a single-threaded process's CPU time is steadier than wall time
(it still varies with the load, hence the rounds and the per-round ratios).

Usage: python benchmarks/bench_vae_decode.py [--resolutions 128 256 384] [--fields vae analytic] [--fit-steps 300]
       [--threads 1]   (on a shared machine: one thread keeps timings stable)
       python benchmarks/bench_vae_decode.py --baseline ee508e9 --fields shipped vae --resolutions 256 384 \
           --num-chunks 8000 --threads 1   (8000: the pipeline's default)
       python benchmarks/bench_vae_decode.py --chunk-sizes 8000 2048 32768 --fields shipped --resolutions 256 \
           --threads 1
       python benchmarks/bench_vae_decode.py --device cuda --resolutions 256 384   (fields evaluated on a GPU; the
           decoder's bookkeeping and marching cubes stay on the CPU, as in the pipeline)
       python benchmarks/bench_vae_decode.py --device cuda --latent-kv 8000 32768   (one field call, released size)
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cgmllm.mesh_utils import load_mesh, normalize_mesh, sample_sdf_points, sample_surface
from cgmllm.modeling_shape_vae import ShapeVAE, farthest_point_sampling
from cgmllm.volume_decoding import decode_volume_dense, decode_volume_hierarchical, marching_cubes


REPOSITORY = Path(__file__).resolve().parents[1]
REAL_MESHES = REPOSITORY.parent / "shared" / "data" / "real_meshes"


def analytic_field(xyz: torch.Tensor) -> torch.Tensor:
    ellipsoid = 0.5 - ((xyz / torch.tensor([0.8, 0.5, 0.3])) ** 2).sum(-1).sqrt() + 0.05 * torch.sin(20 * xyz[:, 0])
    disc = torch.minimum(0.03 - (xyz[:, 2] - 0.2).abs(), 0.9 - xyz[:, :2].norm(dim=-1))
    return torch.maximum(ellipsoid, disc)


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work, so that wall-clock times cover it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def on_device(field, device: torch.device):
    """A pure-torch field evaluated on `device`, returning CPU values as `ShapeVAE.field_fn` does."""
    if device.type == "cpu":
        return field
    return lambda xyz: field(torch.as_tensor(xyz).to(device)).cpu()


def fitted_vae_field(fit_steps: int, seed: int = 0, device: torch.device = torch.device("cpu")):
    """Fits a tiny ShapeVAE to nut.ply (on the CPU, so the field is the same on every device) and returns
    `(field_fn on device, seconds spent fitting, final recon loss)`."""
    torch.manual_seed(seed)
    mesh = normalize_mesh(load_mesh(REAL_MESHES / "nut.ply"))[0]
    model = ShapeVAE(
        num_latents=128, embed_dim=16, width=32, heads=4, num_encoder_layers=1, num_decoder_layers=2,
        num_freqs=6, pc_size=2048, pc_sharpedge_size=0, downsample_ratio=16,
    )
    surface = torch.from_numpy(sample_surface(mesh, 2048, seed=seed))[None]
    points, labels = sample_sdf_points(mesh, num_near=4096, num_uniform=4096, seed=seed)
    points, labels = torch.from_numpy(points)[None], torch.from_numpy(labels)[None]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    recon_loss = float("nan")
    for _ in range(fit_steps):
        batch = torch.randint(points.shape[1], (2048,), generator=generator)  # a fresh subset of the labels each step
        output = model.compute_loss(surface, points[:, batch], labels[:, batch], kl_weight=1e-4, generator=generator)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        recon_loss = output.recon_loss.item()
    fit_seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        features = model.decode(model.encode(surface, generator=generator).mode())
    model.to(device)
    return model.field_fn(features.to(device)), fit_seconds, recon_loss


class CountingField:
    """Wraps a field to count its calls and the points sent (grid points plus the padding of each last chunk)."""

    def __init__(self, field):
        self.field, self.calls, self.points = field, 0, 0

    def __call__(self, xyz):
        self.calls += 1
        self.points += len(xyz)
        return self.field(xyz)


def run(field, resolution: int, num_chunks: int, band: float | None) -> dict:
    row = {"resolution": resolution}
    meshes = {}
    for method in ("dense", "hierarchical"):
        counting = CountingField(field)
        start = time.perf_counter()
        if method == "dense":
            grid = decode_volume_dense(counting, resolution, num_chunks=num_chunks)
        else:
            grid = decode_volume_hierarchical(counting, resolution, num_chunks=num_chunks, band=band)
        row[f"{method}_s"] = time.perf_counter() - start
        row[f"{method}_queries"] = grid.num_queries
        row[f"{method}_calls"] = counting.calls
        assert grid.num_queries <= counting.points < grid.num_queries + counting.calls * num_chunks
        meshes[method] = marching_cubes(grid)
        del grid
    row["same_mesh"] = np.array_equal(meshes["dense"].faces, meshes["hierarchical"].faces) and np.array_equal(
        meshes["dense"].vertices, meshes["hierarchical"].vertices
    )
    row["faces"] = len(meshes["dense"].faces)
    return row


def latent_kv_row(width: int, heads: int, num_latents: int, chunk: int, repeats: int,
                  device: torch.device = torch.device("cpu")) -> dict:
    """Per field call at a given geometry-decoder size (random weights: the cost does not depend on them): the
    latents' keys / values projected in every call (as before) vs once per object (`ShapeVAE.field_fn` now)."""
    torch.manual_seed(0)
    model = ShapeVAE(num_latents=num_latents, embed_dim=64, width=width, heads=heads, num_encoder_layers=1,
                     num_decoder_layers=1, pc_size=num_latents, pc_sharpedge_size=0).eval().to(device)
    features = torch.randn(1, num_latents, width, device=device)
    xyz = torch.rand(chunk, 3, device=device) * 2 - 1
    field = model.field_fn(features)
    with torch.no_grad():
        every_call = lambda: model.query(features, xyz[None])  # noqa: E731
        once = lambda: field(xyz)  # noqa: E731
        times = {}
        for name, fn in (("every_call", every_call), ("once", once)):
            fn()  # warm-up
            best = float("inf")
            for _ in range(repeats):
                synchronize(device)
                start = time.perf_counter()
                fn()
                synchronize(device)
                best = min(best, time.perf_counter() - start)
            times[name] = best
        same = torch.equal(every_call()[0].cpu(), field(xyz))
    return {"width": width, "latents": num_latents, "chunk": chunk, **times, "same": same}


def shipped_field(device: torch.device = torch.device("cpu")):
    """The field of the shipped checkpoint's generation of "a tall cylinder" (seed 0, the pipeline's defaults)."""
    from cgmllm import CGMLLMPipeline

    pipe = CGMLLMPipeline.from_pretrained(REPOSITORY / "checkpoints" / "tiny-world").to(device)
    pipe.set_progress_bar_config(disable=True)
    output = pipe("a tall cylinder", generator=torch.Generator().manual_seed(0), output_type="latent")
    with torch.no_grad():
        return pipe.vae.field_fn(pipe.vae.decode(output.latents))


def load_baseline(revision: str):
    """`volume_decoding.py` as it was at a git revision, imported next to the current one (its relative imports
    resolve to this checkout's package)."""
    source = subprocess.run(
        ["git", "-C", str(REPOSITORY), "show", f"{revision}:modeling_cgmllm/volume_decoding.py"],
        capture_output=True, text=True,
    )
    if source.returncode != 0:
        raise SystemExit(f"Cannot read modeling_cgmllm/volume_decoding.py at {revision!r}: {source.stderr.strip()}")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as file:
        file.write(source.stdout)
    spec = importlib.util.spec_from_file_location("cgmllm._volume_decoding_baseline", file.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    Path(file.name).unlink()
    return module


def time_extraction(decoding, field, resolution: int, num_chunks: int, band: float | None) -> tuple:
    """One hierarchical decode + marching cubes with `decoding` (a volume_decoding module): process CPU seconds of
    the field's calls, of the decoder's own work, and of marching cubes; the grid and the mesh."""
    field_seconds = 0.0

    def timed_field(xyz):
        nonlocal field_seconds
        start = time.process_time()
        values = field(xyz)
        field_seconds += time.process_time() - start
        return values

    start = time.process_time()
    grid = decoding.decode_volume_hierarchical(timed_field, resolution, num_chunks=num_chunks, band=band)
    decoded = time.process_time()
    mesh = decoding.marching_cubes(grid)
    end = time.process_time()
    times = {"total": end - start, "field": field_seconds, "bookkeeping": decoded - start - field_seconds,
             "marching cubes": end - decoded}
    return times, grid, mesh


def make_field(name: str, fit_steps: int, device: torch.device = torch.device("cpu")):
    """`(field, band)`: the fields are logits (band: FlashVDM's |logit| < 0.95) except the analytic distance."""
    if name == "vae":
        return fitted_vae_field(fit_steps, device=device)[0], 0.95
    if name == "shipped":
        return shipped_field(device), 0.95
    return on_device(analytic_field, device), None


def compare_chunk_sizes(args) -> None:
    """The hierarchical extraction of this checkout at several points per field call: CPU seconds, and whether the
    grid is bit-identical to the one at the first size (the decoders need that only within one extraction)."""
    from cgmllm import volume_decoding

    sizes = args.chunk_sizes
    print(f"Cells: median process CPU seconds of {args.rounds} rounds (alternating the order of the sizes)")
    print("| field | res | points per call | field s | total s | field speed vs first size | grid equal to first |")
    print("|" + "---|" * 7)
    for name in args.fields:
        field, band = make_field(name, args.fit_steps, args.device)
        for resolution in args.resolutions:
            runs, equal, reference = {size: [] for size in sizes}, {size: True for size in sizes}, None
            for round_index in range(args.rounds):
                for size in sizes if round_index % 2 == 0 else sizes[::-1]:
                    times, grid, _ = time_extraction(volume_decoding, field, resolution, size, band)
                    runs[size].append(times)
                    if reference is None:
                        reference = grid if size == sizes[0] else None
                    if reference is not None and grid is not reference:
                        equal[size] &= np.array_equal(grid.values, reference.values) and np.array_equal(
                            grid.evaluated, reference.evaluated
                        )
            first = float(np.median([r["field"] for r in runs[sizes[0]]]))
            for size in sizes:
                field_s = float(np.median([r["field"] for r in runs[size]]))
                total_s = float(np.median([r["total"] for r in runs[size]]))
                print(f"| {name} | {resolution} | {size:,} | {field_s:.2f} | {total_s:.2f} | {first / field_s:.2f}x "
                      f"| {equal[size]} |", flush=True)


def compare_with_baseline(args) -> None:
    from cgmllm import volume_decoding as current

    baseline = load_baseline(args.baseline)
    print(f"baseline: volume_decoding.py at {args.baseline}; current: this checkout. Cells: median process CPU "
          f"seconds of {args.rounds} rounds (alternating which runs first), baseline -> current (ratio)")
    parts = ("total", "field", "bookkeeping", "marching cubes")
    print("| field | res | queries | " + " | ".join(parts) + " | identical grid and mesh |")
    print("|" + "---|" * (len(parts) + 4))
    for name in args.fields:
        field, band = make_field(name, args.fit_steps, args.device)
        for resolution in args.resolutions:
            runs = {"baseline": [], "current": []}
            identical = True
            for round_index in range(args.rounds):
                order = ("baseline", "current") if round_index % 2 == 0 else ("current", "baseline")
                results = {}
                for which in order:
                    module = baseline if which == "baseline" else current
                    results[which] = time_extraction(module, field, resolution, args.num_chunks, band)
                    runs[which].append(results[which][0])
                (_, grid_a, mesh_a), (_, grid_b, mesh_b) = results["baseline"], results["current"]
                identical &= (
                    np.array_equal(grid_a.values, grid_b.values) and np.array_equal(grid_a.evaluated, grid_b.evaluated)
                    and np.array_equal(mesh_a.vertices, mesh_b.vertices) and np.array_equal(mesh_a.faces, mesh_b.faces)
                )
                queries = grid_b.num_queries
                del results, grid_a, grid_b, mesh_a, mesh_b
                ratios = "  ".join(f"{p} {runs['baseline'][-1][p] / runs['current'][-1][p]:.2f}x" for p in parts)
                print(f"  {name} @ {resolution}, round {round_index + 1}: {ratios}", flush=True)
            cells = []
            for part in parts:
                old = float(np.median([r[part] for r in runs["baseline"]]))
                new = float(np.median([r[part] for r in runs["current"]]))
                cells.append(f"{old:.2f} -> {new:.2f} ({old / new:.2f}x)")
            print(f"| {name} | {resolution} | {queries:,} | " + " | ".join(cells) + f" | {identical} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128, 256, 384])
    parser.add_argument("--fields", nargs="+", default=["vae", "analytic"], choices=["vae", "analytic", "shipped"])
    parser.add_argument("--fit-steps", type=int, default=300)
    parser.add_argument("--num-chunks", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--latent-kv", type=int, nargs="*", default=None, metavar="CHUNK",
                        help="only time one field call of the released decoder size (width 1024, 16 heads, 4096 "
                             "latents) for these chunk sizes: latents' keys / values per call vs once per object")
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="compare the hierarchical extraction with volume_decoding.py at this git revision")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=None, metavar="N",
                        help="time the hierarchical extraction at these points per field call instead")
    parser.add_argument("--rounds", type=int, default=4,
                        help="--baseline / --chunk-sizes: rounds per field and resolution")
    parser.add_argument("--device", default="cpu",
                        help="where the fields run (e.g. cuda); the decoders' bookkeeping and marching cubes run on "
                             "the CPU as in the pipeline. --baseline / --chunk-sizes report process CPU seconds, "
                             "which mean little on a GPU: use the default mode or --latent-kv there")
    args = parser.parse_args()
    from cgmllm.training.devices import parse_device_argument

    args.device = parse_device_argument(parser, args.device)
    if "shipped" in args.fields and args.baseline is None and args.chunk_sizes is None:
        parser.error("--fields shipped is only offered with --baseline or --chunk-sizes")
    if args.threads:
        torch.set_num_threads(args.threads)
    per_call = "" if args.chunk_sizes else f", {args.num_chunks} points per field call"
    where = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fields on {where}{per_call}")
    if args.baseline is not None:
        compare_with_baseline(args)
        return
    if args.chunk_sizes is not None:
        compare_chunk_sizes(args)
        return
    if args.latent_kv is not None:
        print("| width | latents | chunk | kv every call s | kv once s | speed-up | same values |")
        print("|---|---|---|---|---|---|---|")
        for chunk in args.latent_kv or [2000, 8000]:
            r = latent_kv_row(1024, 16, 4096, chunk, repeats=2, device=args.device)
            print(f"| {r['width']} | {r['latents']} | {r['chunk']} | {r['every_call']:.2f} | {r['once']:.2f} "
                  f"| {r['every_call'] / r['once']:.2f}x | {r['same']} |")
        return

    points = torch.rand(1, 81920, 3, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    farthest_point_sampling(points, 4096, generator=torch.Generator().manual_seed(0))
    print(f"farthest point sampling 81,920 -> 4,096 points: {time.perf_counter() - start:.2f} s")

    rows = []
    for name in args.fields:
        if name == "vae":
            field, fit_seconds, loss = fitted_vae_field(args.fit_steps, device=args.device)
            print(f"tiny ShapeVAE fitted to nut.ply: {args.fit_steps} steps, {fit_seconds:.1f} s, recon BCE {loss:.3f}")
        else:
            field = on_device(analytic_field, args.device)
        # The fitted VAE's field is a logit: refine |logit| < 0.95 too (FlashVDM's test), which catches the small
        # floaters of a briefly fitted model; the analytic field is a distance and needs no band.
        band = 0.95 if name == "vae" else None
        for resolution in args.resolutions:
            row = run(field, resolution, args.num_chunks, band)
            row["field"] = name if band is None else f"{name} (band {band})"
            rows.append(row)
            print(f"  done {name} @ {resolution}", flush=True)

    columns = ["field", "res", "dense queries", "hier. queries", "query ratio", "hier. calls", "dense s", "hier. s"]
    header = "| " + " | ".join(columns + ["speed-up", "same mesh", "faces"]) + " |"
    print()
    print(header)
    print("|" + "---|" * 11)
    for r in rows:
        print(
            f"| {r['field']} | {r['resolution']} | {r['dense_queries']:,} | {r['hierarchical_queries']:,} "
            f"| {r['dense_queries'] / r['hierarchical_queries']:.1f}x | {r['hierarchical_calls']} "
            f"| {r['dense_s']:.2f} | {r['hierarchical_s']:.2f} | {r['dense_s'] / r['hierarchical_s']:.1f}x "
            f"| {r['same_mesh']} | {r['faces']:,} |"
        )


if __name__ == "__main__":
    main()
