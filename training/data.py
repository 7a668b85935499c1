"""3D caption data sets with `datasets`: one schema for three on-disk layouts.

Every loader returns a `datasets.Dataset` with the columns

    uid      string     sample id (file stem, Cap3D uid, or the parquet `uid` column / row index)
    caption  string     the caption
    mesh     Mesh(decode=False)         mesh bytes/path (mesh layouts), or
    points   Sequence(Sequence(float32)) `(P, 6|7)` point cloud, xyz + normal [+ sharp flag] (Cap3D `.npy`)
    captions Sequence(string)            optional: paraphrases of `caption`, when the metadata has them (the
                                          collator then draws one per sample and epoch)
    image    Image()                     optional: a view of the object, when the meshfolder metadata has an
                                          image column (embedded bytes, or a file name relative to the metadata);
                                          the collator's image -> 3D and image captioning tasks need it

Layouts:
    meshfolder  `DIR/[split/]*.glb|ply|stl` + `metadata.csv|jsonl|parquet` with `file_name` and a caption column
                (the `datasets` `meshfolder` builder); the tiny world (`cgmllm.training.tiny_world`) is one.
    cap3d       a header-less `uid,caption` CSV (Cap3D's `Cap3D_automated_Objaverse_full.csv`) and a folder of
                meshes or `.npy` point clouds named `<uid>.<ext>`. Spec: `{"captions": CSV, "shapes": DIR}`, or a
                folder holding exactly one `.csv` next to the shapes (or a `shapes/` subfolder).
    parquet     parquet file(s) with a caption column and a mesh column (a `Mesh()` struct or raw bytes).

Bad samples (missing files, unreadable meshes, empty captions) raise a `ValueError` naming the sample; with
`skip_bad_samples=True` they are dropped with a logged warning instead.
"""

import csv
import glob
import logging
import os
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, Features, Image, Mesh, Sequence, Value, load_dataset


logger = logging.getLogger(__name__)

MESH_SUFFIXES = (".glb", ".gltf", ".ply", ".stl", ".obj", ".off")
POINT_SUFFIXES = (".npy",)
LAYOUTS = ("auto", "meshfolder", "cap3d", "parquet")
PARAPHRASE_COLUMN = "captions"
"""Optional list-of-strings column: paraphrases of `caption`; the collator draws one of them per sample and epoch."""


def load_caption_dataset(
    path_or_spec,
    layout: str = "auto",
    caption_column: str = "caption",
    mesh_column: str = "mesh",
    split: str = "train",
    skip_bad_samples: bool = False,
    validate: bool = True,
    image_column: str | None = "image",
) -> Dataset:
    """Load a 3D caption set into the common schema (`uid`, `caption`, `mesh` or `points`, optional `image`).

    Args:
        path_or_spec: a folder, a parquet file / glob, or for Cap3D a dict `{"captions": CSV, "shapes": DIR}`.
        layout: "auto" (guessed from the files), "meshfolder", "cap3d" or "parquet".
        caption_column: caption column of the metadata / parquet (Cap3D has no header: always the 2nd column).
        mesh_column: mesh column of the parquet layout.
        split: split of the meshfolder layout.
        skip_bad_samples: drop bad samples with a warning instead of raising.
        validate: parse every mesh once (slow for large sets; the error then names the sample up front).
        image_column: meshfolder metadata column with a view of each object (`None`: never load images).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; expected one of {LAYOUTS}.")
    if layout == "auto":
        layout = detect_layout(path_or_spec)
    if layout == "meshfolder":
        rows = _meshfolder_rows(path_or_spec, caption_column, split, image_column)
    elif layout == "cap3d":
        rows = _cap3d_rows(path_or_spec)
    else:
        rows = _parquet_rows(path_or_spec, caption_column, mesh_column)
    rows = _check_rows(rows, skip_bad_samples, validate)
    if not rows:
        raise ValueError(f"No usable samples in {path_or_spec!r} (layout {layout!r}).")
    if "points" in rows[0]:
        features = Features({"uid": Value("string"), "caption": Value("string"),
                             "points": Sequence(Sequence(Value("float32")))})
    else:
        features = Features({"uid": Value("string"), "caption": Value("string"), "mesh": Mesh(decode=False)})
    if any(PARAPHRASE_COLUMN in row for row in rows):
        features[PARAPHRASE_COLUMN] = Sequence(Value("string"))
        for row in rows:
            row.setdefault(PARAPHRASE_COLUMN, [row["caption"]])
    if any(row.get("image") is not None for row in rows):
        features["image"] = Image()
        for row in rows:
            row.setdefault("image", None)
    columns = {name: [row[name] for row in rows] for name in features}
    return Dataset.from_dict(columns, features=features)


def detect_layout(path_or_spec) -> str:
    if isinstance(path_or_spec, dict):
        return "cap3d"
    path = Path(path_or_spec)
    if path.is_file() and path.suffix == ".parquet" or "*" in str(path_or_spec):
        return "parquet"
    if path.is_dir():
        # `metadata.parquet` next to mesh files is a mesh folder's metadata, not a parquet data set.
        if glob.glob(str(path / "**" / "metadata.*"), recursive=True):
            return "meshfolder"
        if glob.glob(str(path / "**" / "*.parquet"), recursive=True):
            return "parquet"
        if glob.glob(str(path / "*.csv")):
            return "cap3d"
    raise ValueError(
        f"Cannot tell the layout of {path_or_spec!r}: expected a parquet file/folder, a mesh folder with "
        "metadata.csv/jsonl/parquet, or a Cap3D folder (uid,caption CSV + shapes). Pass `layout=` explicitly."
    )


# ----------------------------------------------------------------------------------------------------------------
# Layout readers: each yields dicts {uid, caption, mesh|points, _error}
# ----------------------------------------------------------------------------------------------------------------
def _image_source(value, folder: Path):
    """A metadata image entry -> `Image()` input: embedded `{"bytes", "path"}`, or a file name relative to the
    metadata file (made absolute, as the mesh paths are)."""
    if value is None or isinstance(value, dict) and not (value.get("bytes") or value.get("path")):
        return None
    if isinstance(value, dict):
        if value.get("bytes"):
            return {"bytes": bytes(value["bytes"]), "path": None}
        value = value["path"]
    return {"bytes": None, "path": str(folder / str(value))}


def _meshfolder_rows(folder, caption_column: str, split: str, image_column: str | None = None) -> list[dict]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"Mesh folder {folder} does not exist.")
    # A `folder/<split>/` subfolder (the tiny world, `datasets`' split layout) holds that split only.
    root = folder / split if (folder / split).is_dir() else folder
    # The builder silently ignores metadata rows whose file is missing: check them first, naming the sample.
    rows = []
    for meta in sorted(root.rglob("metadata.*")):
        if meta.suffix == ".csv":
            with open(meta, newline="") as handle:
                records = list(csv.DictReader(handle))
        elif meta.suffix in (".jsonl", ".json"):
            import json

            records = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
        elif meta.suffix == ".parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(meta).names
            wanted = [name for name in ("file_name", caption_column, PARAPHRASE_COLUMN, image_column)
                      if name in names]
            records = pq.read_table(meta, columns=wanted).to_pylist()
        else:
            continue
        for record in records:
            if "file_name" not in record:
                raise ValueError(f"{meta} has no `file_name` column.")
            if caption_column not in record:
                raise ValueError(f"{meta} has no caption column {caption_column!r} (columns: {sorted(record)}).")
            mesh_path = meta.parent / record["file_name"]
            error = None if mesh_path.is_file() else f"mesh file {mesh_path} is missing"
            row = {"uid": Path(record["file_name"]).stem, "caption": record[caption_column],
                   "mesh": {"path": str(mesh_path), "bytes": None}, "_error": error}
            if record.get(PARAPHRASE_COLUMN):
                row[PARAPHRASE_COLUMN] = [str(text) for text in record[PARAPHRASE_COLUMN]]
            if image_column and record.get(image_column) is not None:
                row["image"] = _image_source(record[image_column], meta.parent)
                if row["image"] and row["image"]["path"] and not Path(row["image"]["path"]).is_file() and not error:
                    row["_error"] = f"image file {row['image']['path']} is missing"
            rows.append(row)
    if not rows:
        raise ValueError(f"{root} has no metadata.csv / metadata.jsonl / metadata.parquet with `file_name` and "
                         f"{caption_column!r}.")
    if any(row["_error"] is None for row in rows):
        # Cross-check with the `datasets` builder that every present file is part of the data set.
        built = load_dataset("meshfolder", data_dir=str(folder), split=split).cast_column("mesh", Mesh(decode=False))
        if caption_column not in built.column_names:
            raise ValueError(f"The meshfolder builder found no column {caption_column!r} in {folder}.")
    return rows


def _cap3d_rows(spec) -> list[dict]:
    if isinstance(spec, dict):
        unknown = set(spec) - {"captions", "shapes"}
        if unknown:
            raise ValueError(f"Unknown Cap3D spec keys {sorted(unknown)}; expected 'captions' and 'shapes'.")
        csv_path, shapes = Path(spec["captions"]), Path(spec["shapes"])
    else:
        folder = Path(spec)
        csvs = sorted(folder.glob("*.csv"))
        if len(csvs) != 1:
            raise ValueError(f"A Cap3D folder must hold exactly one uid,caption .csv; {folder} has {len(csvs)}.")
        csv_path = csvs[0]
        shapes = folder / "shapes" if (folder / "shapes").is_dir() else folder
    if not csv_path.is_file():
        raise ValueError(f"Cap3D caption file {csv_path} does not exist.")
    if not shapes.is_dir():
        raise ValueError(f"Cap3D shape folder {shapes} does not exist.")
    captions = load_dataset("csv", data_files=str(csv_path), column_names=["uid", "caption"], split="train",
                            keep_default_na=False)
    by_stem = {}
    for suffix in MESH_SUFFIXES + POINT_SUFFIXES:
        for file in shapes.glob(f"*{suffix}"):
            by_stem.setdefault(file.stem, file)
    rows = []
    for record in captions:
        uid, caption = str(record["uid"]), record["caption"]
        file = by_stem.get(uid)
        row = {"uid": uid, "caption": caption, "_error": None}
        if file is None:
            row["_error"] = f"no mesh or .npy point cloud named {uid}.* in {shapes}"
        elif file.suffix == ".npy":
            row["points"] = str(file)
        else:
            row["mesh"] = {"path": str(file), "bytes": None}
        rows.append(row)
    kinds = {"points" if "points" in row else "mesh" for row in rows if row["_error"] is None}
    if len(kinds) > 1:
        raise ValueError(f"{shapes} mixes meshes and .npy point clouds; use one kind per data set.")
    kind = kinds.pop() if kinds else "mesh"
    for row in rows:
        row.setdefault(kind, None)
    return rows


def _parquet_rows(path, caption_column: str, mesh_column: str) -> list[dict]:
    path = str(path)
    files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)) if os.path.isdir(path) else path
    if not files:
        raise ValueError(f"No parquet files under {path}.")
    table = load_dataset("parquet", data_files=files, split="train")
    for column in (caption_column, mesh_column):
        if column not in table.column_names:
            raise ValueError(f"Parquet data {path} has no column {column!r} (columns: {table.column_names}).")
    if isinstance(table.features[mesh_column], Mesh):
        table = table.cast_column(mesh_column, Mesh(decode=False))
    rows = []
    for index, record in enumerate(table):
        uid = str(record["uid"]) if "uid" in record else str(index)
        mesh = record[mesh_column]
        if isinstance(mesh, (bytes, bytearray)):
            mesh = {"bytes": bytes(mesh), "path": None}
        error = None if mesh and (mesh.get("bytes") or mesh.get("path")) else "no mesh bytes"
        rows.append({"uid": uid, "caption": record[caption_column], "mesh": mesh, "_error": error})
    return rows


def _check_rows(rows: list[dict], skip_bad_samples: bool, validate: bool) -> list[dict]:
    good = []
    for row in rows:
        error = row.pop("_error")
        if error is None and (not isinstance(row["caption"], str) or not row["caption"].strip()):
            error = "empty caption"
        if error is None and validate:
            try:
                if row.get("points") is not None:
                    row["points"] = load_points(row["points"]).tolist()
                else:
                    from cgmllm.mesh_utils import load_mesh

                    load_mesh(_mesh_source(row["mesh"]))
            except ValueError as exc:
                error = f"unreadable shape: {exc}"
            if error is None and row.get("image") is not None:
                error = _image_error(row["image"])
        elif error is None and row.get("points") is not None:
            row["points"] = load_points(row["points"]).tolist()
        if error is not None:
            message = f"Bad sample {row['uid']!r}: {error}."
            if not skip_bad_samples:
                raise ValueError(message + " Pass skip_bad_samples=True to drop such samples with a warning.")
            logger.warning("Skipping %s", message)
            continue
        good.append(row)
    return good


# ----------------------------------------------------------------------------------------------------------------
# Shapes -> VAE surfaces
# ----------------------------------------------------------------------------------------------------------------
def load_points(path) -> np.ndarray:
    try:
        points = np.load(path)
    except Exception as exc:  # numpy raises several types for corrupt files
        raise ValueError(f"Could not read point cloud {path}: {type(exc).__name__}: {exc}") from exc
    if points.ndim != 2 or points.shape[1] not in (6, 7) or not np.isfinite(points).all():
        raise ValueError(
            f"Point cloud {path} must be a finite (P, 6) or (P, 7) array (xyz + normal [+ sharp]), got "
            f"{points.shape}."
        )
    return points.astype(np.float32)


def _image_error(image: dict) -> str | None:
    """None if the `Image()` entry decodes, else why not (checked up front, not deep inside a training step)."""
    import io

    from PIL import Image as PILImage

    try:
        with PILImage.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]) as opened:
            opened.verify()
    except Exception as exc:  # PIL raises many types for corrupt files
        return f"unreadable image: {type(exc).__name__}: {exc}"
    return None


def _mesh_source(mesh: dict):
    if mesh.get("bytes"):
        return bytes(mesh["bytes"])
    return mesh["path"]


def example_surface(example: dict, vae_config, seed: int = 0, num_points: int | None = None,
                    num_sharp_points: int | None = None) -> torch.Tensor:
    """The `(P, 7)` VAE input of one example (`mesh` or `points` column), drawn by `mesh_utils.sample_vae_surface`
    with the VAE config's counts (`pc_size` uniform + `pc_sharpedge_size` sharp), as mesh captioning draws it."""
    from cgmllm.mesh_utils import sample_vae_surface

    if example.get("points") is not None:
        source = np.asarray(example["points"], dtype=np.float32)
    else:
        mesh = example["mesh"]
        source = _mesh_source(mesh) if isinstance(mesh, dict) else mesh
    return sample_vae_surface(source, vae_config, seed=seed, num_points=num_points, num_sharp_points=num_sharp_points)


__all__ = ["LAYOUTS", "detect_layout", "example_surface", "load_caption_dataset", "load_points"]
