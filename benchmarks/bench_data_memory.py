"""Memory of loading a large 3D caption set: Python rows + nested lists vs `datasets` map / Array2D vs streaming.

A synthetic Cap3D-layout set is written once: a header-less `uid,caption` CSV and `shapes/<uid>.npy` clouds of
`(points, 6)` float32 (xyz + normal). Each method then runs in a fresh process with its own empty `datasets` cache,
so that its peak resident memory (`ru_maxrss`; the largest `num_proc` worker's is reported apart) is its own:

    import      importing numpy / torch / datasets / cgmllm only: the floor every method pays
    lists       the previous loader's way: every row built in Python, clouds as `np.load(f).tolist()`, then
                `Dataset.from_dict` with `Sequence(Sequence(float32))` features
    map         `load_caption_dataset(...)`: `Dataset.map` writes `Array2D((None, 6))` rows into memory-mapped Arrow
    map_procN   the same with `num_proc=N`
    stream      `load_caption_dataset(..., streaming=True)`, iterated to the end

After building, every method reads every cloud once (as numpy, batch by batch), and reports the peak again.

Usage: python benchmarks/bench_data_memory.py [--num-clouds 100000] [--num-points 64] [--num-proc 2] [--work DIR]
       [--methods import lists map map_proc stream]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_cap3d_set(folder: Path, num_clouds: int, num_points: int, seed: int = 0) -> None:
    import numpy as np

    shapes = folder / "shapes"
    shapes.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(folder / "captions.csv", "w") as handle:
        for i in range(num_clouds):
            uid = f"{i:08x}"
            np.save(shapes / f"{uid}.npy", rng.standard_normal((num_points, 6), dtype=np.float32))
            handle.write(f"{uid},a synthetic cloud number {i}\n")


def _peak_mib() -> float:
    """Peak RSS of this process, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker_peak_mib() -> float:
    """Peak RSS of the largest finished child (a `num_proc` worker; forked, so it counts pages shared with us)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def _arrow_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.arrow"))


def _read_all(dataset) -> float:
    """Touch every cloud once as numpy (the way a collator would read them)."""
    import numpy as np

    total = 0.0
    for batch in dataset.with_format("numpy").iter(batch_size=1000):
        column = batch["points"]
        total += float(sum(np.asarray(cloud, dtype=np.float32).sum() for cloud in column))
    return total


def child(method: str, data: Path, cache: Path, num_proc: int) -> dict:
    os.environ["HF_DATASETS_CACHE"] = str(cache)
    import numpy as np  # noqa: F401
    import torch  # noqa: F401
    from datasets import Dataset, Features, Sequence, Value, disable_progress_bars

    from cgmllm.training.data import load_caption_dataset

    disable_progress_bars()
    result = {"method": method}
    start = time.perf_counter()
    if method == "import":
        result.update(build_s=0.0, build_peak_mib=_peak_mib(), rows=0)
        return result
    if method == "stream":
        stream = load_caption_dataset(data, layout="cap3d", streaming=True)
        rows = 0
        for batch in stream.with_format("numpy").iter(batch_size=1000):
            rows += len(batch["uid"])
        result.update(build_s=time.perf_counter() - start, build_peak_mib=_peak_mib(), rows=rows,
                      read_s=0.0, read_peak_mib=_peak_mib(), arrow_mib=_arrow_bytes(cache) / 2**20)
        return result
    if method == "lists":
        uids, captions, points = [], [], []
        for line in open(data / "captions.csv"):
            uid, caption = line.rstrip("\n").split(",", 1)
            uids.append(uid)
            captions.append(caption)
            points.append(np.load(data / "shapes" / f"{uid}.npy").astype(np.float32).tolist())
        features = Features({"uid": Value("string"), "caption": Value("string"),
                             "points": Sequence(Sequence(Value("float32")))})
        dataset = Dataset.from_dict({"uid": uids, "caption": captions, "points": points}, features=features)
        del uids, captions, points
    else:
        dataset = load_caption_dataset(data, layout="cap3d", num_proc=num_proc if method == "map_proc" else None)
    result.update(build_s=time.perf_counter() - start, build_peak_mib=_peak_mib(), rows=len(dataset),
                  arrow_mib=_arrow_bytes(cache) / 2**20, worker_peak_mib=_worker_peak_mib())
    start = time.perf_counter()
    _read_all(dataset)
    result.update(read_s=time.perf_counter() - start, read_peak_mib=_peak_mib())
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-clouds", type=int, default=100_000)
    parser.add_argument("--num-points", type=int, default=64)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--work", default=None, help="folder for the synthetic set (default: a temporary one)")
    parser.add_argument("--methods", nargs="+", default=["import", "lists", "map", "map_proc", "stream"])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-data-memory-"))
    data = work / "cap3d"
    if args.child:
        print(json.dumps(child(args.child, data, work / f"cache-{args.child}", args.num_proc)))
        return
    if not (data / "captions.csv").is_file():
        start = time.perf_counter()
        write_cap3d_set(data, args.num_clouds, args.num_points)
        seconds = time.perf_counter() - start
        print(f"wrote {args.num_clouds} clouds of ({args.num_points}, 6) float32 in {seconds:.0f} s")
    raw_mib = args.num_clouds * args.num_points * 6 * 4 / 2**20
    print(f"set: {args.num_clouds} clouds x ({args.num_points}, 6) float32 = {raw_mib:.1f} MiB of point data; "
          f"num_proc={args.num_proc}; {os.cpu_count()} CPUs\n")
    results = []
    for method in args.methods:
        shutil.rmtree(work / f"cache-{method}", ignore_errors=True)
        command = [sys.executable, __file__, "--child", method, "--work", str(work), "--num-proc", str(args.num_proc)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            print(f"{method}: failed\n{done.stderr[-3000:]}")
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        shutil.rmtree(work / f"cache-{method}", ignore_errors=True)
    floor = next((r["build_peak_mib"] for r in results if r["method"] == "import"), 0.0)
    header = (f"{'method':<10} {'rows':>7} {'build s':>8} {'peak MiB':>9} {'above import':>13} {'+ read all':>11} "
              f"{'Arrow MiB':>10} {'worker MiB':>11}")
    print(header)
    print("-" * len(header))
    for r in results:
        if r["method"] == "import":
            print(f"{'import':<10} {'':>7} {'':>8} {r['build_peak_mib']:>9.0f}")
            continue
        label = f"map_proc{args.num_proc}" if r["method"] == "map_proc" else r["method"]
        worker = f"{r['worker_peak_mib']:>11.0f}" if r["method"] == "map_proc" else f"{'-':>11}"
        print(f"{label:<10} {r['rows']:>7} {r['build_s']:>8.1f} {r['build_peak_mib']:>9.0f} "
              f"{r['build_peak_mib'] - floor:>13.0f} {r['read_peak_mib']:>11.0f} {r['arrow_mib']:>10.1f} {worker}")
    by_method = {r["method"]: r for r in results}
    if "lists" in by_method and "map" in by_method:
        ratio = (by_method["lists"]["build_peak_mib"] - floor) / max(by_method["map"]["build_peak_mib"] - floor, 1.0)
        print(f"\nmemory above the import floor, lists / map: {ratio:.1f}x")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
