"""Encode a 3D caption set once with the frozen ShapeVAE into a cached `datasets` folder.

The cache has the columns `uid`, `caption` (plus `captions` and `image` when the data has them) and one latent column
per resolution: `latents` `(N, C)` float32 when a single `num_latents` is asked for, else `latents_{N}` for each N
(the stages of progressive training).

    cgmllm-preprocess --data DATA --shape-vae VAE --num-latents 512 1024 --out CACHE [--streaming]
    cgmllm-preprocess --data PointLLM/ --out CACHE     # PointBERT clouds: stored as read (normalised), no VAE

`--streaming` reads the source lazily (`datasets` streaming) and writes the cache as it goes, so neither the source
(e.g. the CG-MLLM t500k parquet folders) nor the cache is ever copied into memory or into the `datasets` cache.
"""

import argparse
import logging
import os

import torch
from datasets import Array2D, Dataset, Features, Image, IterableDataset, List, Sequence, Value, load_from_disk

from .checks import check_finite_samples
from .data import LAYOUTS, PARAPHRASE_COLUMN, example_surface, load_caption_dataset


logger = logging.getLogger(__name__)


def load_shape_vae(path, torch_dtype=None):
    """A ShapeVAE from a diffusers folder (`config.json`) or an official Hunyuan3D checkpoint / folder, loaded
    strictly (a missing or unexpected weight raises, naming it)."""
    from cgmllm.modeling_shape_vae import ShapeVAE

    from .checkpointing import from_pretrained_strict

    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        vae = from_pretrained_strict(ShapeVAE, path)  # a missing weight is an error, not a meta tensor
    else:
        vae = ShapeVAE.from_hunyuan3d(path)
    return vae.to(torch_dtype or torch.float32).eval().requires_grad_(False)


def latent_column(num_latents: int, all_sizes) -> str:
    return "latents" if len(all_sizes) == 1 else f"latents_{num_latents}"


@torch.no_grad()
def encode_latents(vae, surfaces: torch.Tensor, num_latents: int, seed: int = 0) -> torch.Tensor:
    """`(B, P, 7)` surfaces -> `(B, N, C)` latents (posterior sample with a seeded generator)."""
    generator = torch.Generator(device=vae.device).manual_seed(seed)
    posterior = vae.encode(surfaces, num_latents=num_latents, generator=generator)
    return posterior.sample(generator).float().cpu()


def encode_dataset(dataset: Dataset | IterableDataset, vae, num_latents=512, num_points: int | None = None,
                   num_sharp_points: int | None = None, seed: int = 0, batch_size: int = 8) -> Dataset:
    """Sample every shape's surface and encode it at each `num_latents`; returns `uid`, `caption` (and `captions`
    paraphrases, `question`, the `image` / `images` views when the data set has them) and the latent column(s).

    Surfaces are drawn by `mesh_utils.sample_vae_surface` with the VAE's own pool sizes (`pc_size` uniform +
    `pc_sharpedge_size` sharp points, unless `num_points` / `num_sharp_points` override them), the draw mesh
    captioning uses too. Sample `i` uses seed `seed + i`, so the cache is reproducible. An `IterableDataset`
    (streaming) is encoded as it is iterated.
    """
    if "point_cloud" in dataset.column_names:
        raise ValueError("This data set holds PointBERT clouds (`point_cloud`: xyz + rgb, PointLLM's caption set), not "
                         "surfaces with normals: the ShapeVAE has nothing to encode. They feed the PointBERT "
                         "captioning path directly, without a latent cache.")
    sizes = [num_latents] if isinstance(num_latents, int) else list(num_latents)
    channels = vae.config.embed_dim
    text_columns = {"uid": Value("string"), "caption": Value("string")}
    if PARAPHRASE_COLUMN in dataset.column_names:
        text_columns[PARAPHRASE_COLUMN] = Sequence(Value("string"))
    if "question" in dataset.column_names:
        text_columns["question"] = Value("string")
    if "image" in dataset.column_names:  # carried for the image tasks; not decoded here
        dataset = dataset.cast_column("image", Image(decode=False))
        text_columns["image"] = Image()
    if "images" in dataset.column_names:
        dataset = dataset.cast_column("images", List(Image(decode=False)))
        text_columns["images"] = List(Image())
    features = Features({**text_columns,
                         **{latent_column(n, sizes): Array2D((n, channels), "float32") for n in sizes}})

    def encode(batch, indices):
        examples = [dict(zip(batch, values)) for values in zip(*batch.values())]
        surfaces = torch.stack([
            example_surface(example, vae.config, seed=seed + index, num_points=num_points,
                            num_sharp_points=num_sharp_points)
            for example, index in zip(examples, indices)
        ])
        # Nothing non-finite enters the cache: one NaN latent turns every weight NaN within a step or two.
        uids = batch["uid"]
        check_finite_samples(surfaces, uids, "The surface points")
        out = {name: batch[name] for name in text_columns}
        for n in sizes:
            latents = encode_latents(vae, surfaces, n, seed=seed + indices[0])
            check_finite_samples(latents, uids, f"The ShapeVAE latents (N={n})")
            out[latent_column(n, sizes)] = latents.numpy()
        return out

    options = {} if isinstance(dataset, IterableDataset) else {"desc": "Encoding shapes"}
    return dataset.map(encode, batched=True, batch_size=batch_size, with_indices=True,
                       remove_columns=dataset.column_names, features=features, **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cgmllm-preprocess", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="data folder / parquet / Cap3D folder")
    parser.add_argument("--layout", default="auto", choices=LAYOUTS)
    parser.add_argument("--caption-column", default="caption")
    parser.add_argument("--shape-vae", default=None,
                        help="ShapeVAE folder or Hunyuan3D checkpoint (required, except for PointLLM clouds)")
    parser.add_argument("--num-latents", type=int, nargs="+", default=[512])
    parser.add_argument("--num-points", type=int, default=None, help="uniform surface points (default: VAE pc_size)")
    parser.add_argument("--num-sharp-points", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-bad-samples", action="store_true")
    parser.add_argument("--streaming", action="store_true",
                        help="read the data lazily and write the cache as it goes (large sets)")
    parser.add_argument("--num-proc", type=int, default=None, help="processes for reading the data (not streaming)")
    parser.add_argument("--out", required=True, help="output folder (datasets.save_to_disk)")
    return parser


def main(argv=None) -> Dataset:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    dataset = load_caption_dataset(args.data, layout=args.layout, caption_column=args.caption_column,
                                   skip_bad_samples=args.skip_bad_samples, streaming=args.streaming,
                                   num_proc=args.num_proc)
    if "point_cloud" in dataset.column_names:
        # PointLLM's set: PointBERT reads the clouds themselves (its features would be ~12x larger than the clouds),
        # so the cache is the loaded set: captions, questions and the normalised clouds, read once into Arrow.
        if args.shape_vae:
            raise ValueError(f"{args.data} holds PointBERT clouds (PointLLM), which a ShapeVAE does not encode: drop "
                             "--shape-vae to cache the clouds as they are.")
        cached = dataset
    else:
        if not args.shape_vae:
            raise ValueError("--shape-vae is required to encode shapes into latents.")
        vae = load_shape_vae(args.shape_vae)
        cached = encode_dataset(dataset, vae, args.num_latents, args.num_points, args.num_sharp_points, args.seed,
                                args.batch_size)
    if isinstance(cached, IterableDataset):
        cached = _write_stream(cached, args.out)
    else:
        cached.save_to_disk(args.out)
    logger.info("Wrote %d encoded samples to %s", len(cached), args.out)
    return load_from_disk(args.out)


def _write_stream(stream: IterableDataset, out: str) -> Dataset:
    """Write a streamed cache batch by batch (`Dataset.from_generator`), staging under `out`'s parent folder."""
    import shutil
    import tempfile
    import uuid

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".cgmllm-preprocess-", dir=parent)
    try:
        # A fresh fingerprint: hashing the generator would pickle the stream and the VAE it closes over.
        Dataset.from_generator(lambda: iter(stream), features=stream.features, cache_dir=staging,
                               fingerprint=uuid.uuid4().hex).save_to_disk(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_from_disk(out)


def script(argv=None) -> int:
    """The `cgmllm-preprocess` console script: `main` returns the cache for Python callers; a command exits 0."""
    main(argv)
    return 0


__all__ = ["build_parser", "encode_dataset", "encode_latents", "load_shape_vae", "main", "script"]
