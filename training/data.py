"""3D caption data sets through `datasets`: one schema for six on-disk layouts, in memory-mapped Arrow or streamed.

Every loader returns a `datasets.Dataset` (or, with `streaming=True`, a `datasets.IterableDataset` that reads the
files as it is iterated) with the columns

    uid          string               sample id (file stem, Cap3D / PointLLM / parquet uid)
    caption      string               the caption (None only for t500k rows without captions: image -> 3D only)
    captions     List(string)         optional: paraphrases of `caption` (the collator draws one per sample and epoch)
    question     string               optional: the question asked about the object (PointLLM's human turn)
and exactly one shape column
    mesh         Mesh(decode=False)           mesh file path or bytes (meshfolder, Cap3D meshes, parquet)
    points       Array2D((None, 6|7), float32) xyz + normal [+ sharp flag] (Cap3D `.npy` clouds)
    surface      binary                        npz bytes with `random_surface` (CG-MLLM t500k)
    surface_file string                        path of a Hunyuan3D-2.1 `<uid>_surface.npz`
    point_cloud  Array2D((None, 6), float32)   xyz + rgb, normalised for PointBERT (PointLLM)
and optionally the views of the object
    image        Image()              one view (meshfolder metadata `image` column: embedded bytes or a file name)
    images       List(Image())        several views (t500k `image_list`, Hunyuan3D-2.1 `render_cond/*.png`); the
                                      collator draws one per sample and epoch

Layouts (`layout=`):
    meshfolder    `DIR/[split/]*.glb|ply|stl|obj|off` + `metadata.csv|jsonl|parquet` with `file_name` and a caption
                  column, read by the `datasets` `meshfolder` builder; the tiny world is one. Mesh files that no
                  metadata row names are left out with a warning that names them.
    cap3d         a header-less `uid,caption` CSV (Cap3D's `Cap3D_automated_Objaverse_full.csv`) and a folder of
                  meshes or `.npy` clouds named `<uid>.<ext>`: `{"captions": CSV, "shapes": DIR}`, or a folder with
                  exactly one `.csv` next to the shapes (or a `shapes/` subfolder). Duplicate uids keep their first
                  row and `NA` / `nan` / empty captions are dropped, each with a warning naming the uids.
    hunyuan3d     the same CSV with Hunyuan3D-2.1's `<uid>_surface.npz` files (searched recursively). In its
                  `<uid>/geo_data/` tree, the renders `<uid>/render_cond/*.png` become the `images` column.
    parquet       parquet file(s) with a caption column and a mesh column (a `Mesh()` struct or raw bytes).
    cgmllm_t500k  the official CG-MLLM 3D sets (see `cgmllm.training.official_data`).
    pointllm      PointLLM's caption set: `{"captions": JSONL, "shapes": 8192_npy/}`, or a folder holding one
                  `*.jsonl` and `8192_npy/`.

Rows are built by `Dataset.map` (in `num_proc` processes) into Arrow files that are memory-mapped, never into Python
lists: a data set larger than RAM loads. Bad samples (missing files, unreadable shapes, empty captions) raise a
`ValueError` naming the sample; with `skip_bad_samples=True` they are dropped with a logged warning instead (when
streaming, as they are reached).
"""

import glob
import logging
import os
from pathlib import Path

import numpy as np
import torch
from datasets import (Array2D, Dataset, Features, Image, IterableDataset, List, Mesh, Value, concatenate_datasets,
                      load_dataset)

from .official_data import (SURFACE_SUFFIX, is_missing_caption, is_t500k_schema, pointllm_rows, read_surface_npz,
                            surface_points, t500k_files, t500k_text_columns)


logger = logging.getLogger(__name__)

MESH_SUFFIXES = (".glb", ".gltf", ".ply", ".stl", ".obj", ".off")
POINT_SUFFIXES = (".npy",)
LAYOUTS = ("auto", "meshfolder", "cap3d", "hunyuan3d", "parquet", "cgmllm_t500k", "pointllm")
SHAPE_COLUMNS = ("mesh", "points", "surface", "surface_file", "point_cloud")
PARAPHRASE_COLUMN = "captions"
"""Optional list-of-strings column: paraphrases of `caption`; the collator draws one of them per sample and epoch."""
COLUMN_ORDER = ("uid", "caption", PARAPHRASE_COLUMN, "question") + SHAPE_COLUMNS + ("image", "images")
MAX_NAMED = 20
"""How many names a warning lists before it only counts."""


def load_caption_dataset(
    path_or_spec,
    layout: str = "auto",
    caption_column: str = "caption",
    mesh_column: str = "mesh",
    split: str = "train",
    skip_bad_samples: bool = False,
    validate: bool = True,
    image_column: str | None = "image",
    streaming: bool = False,
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
    """Load a 3D caption set into the common schema (module docstring).

    Args:
        path_or_spec: a folder, a parquet file / glob, or a dict `{"captions": CSV | JSONL, "shapes": DIR}`.
        layout: one of `LAYOUTS`; "auto" guesses it from the files.
        caption_column: caption column of the meshfolder metadata / parquet (Cap3D has no header: the 2nd column).
        mesh_column: mesh column of the parquet layout.
        split: split of the meshfolder layout.
        skip_bad_samples: drop bad samples with a warning instead of raising.
        validate: parse every shape once while loading (slower; the error then names the sample up front).
            Point clouds (`points`, `point_cloud`) are always read, since they are stored in the data set.
        image_column: meshfolder metadata column with a view of each object (`None`: never load images).
        streaming: return an `IterableDataset` that reads the files lazily (for sets that should not be copied into
            the Arrow cache, e.g. the full t500k or PointLLM sets). Bad samples surface as they are reached.
        num_proc: processes for building the rows (`Dataset.map`); ignored when streaming.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; expected one of {LAYOUTS}.")
    if layout == "auto":
        layout = detect_layout(path_or_spec)
    options = {"validate": validate, "streaming": streaming, "num_proc": None if streaming else num_proc}
    if layout == "meshfolder":
        dataset = _meshfolder(path_or_spec, caption_column, split, image_column, **options)
    elif layout in ("cap3d", "hunyuan3d"):
        dataset = _captioned_shapes(path_or_spec, layout, **options)
    elif layout == "parquet":
        dataset = _parquet(path_or_spec, caption_column, mesh_column, **options)
    elif layout == "cgmllm_t500k":
        dataset = _t500k(path_or_spec, **options)
    else:
        dataset = _pointllm(path_or_spec, **options)
    dataset = _screen(dataset, skip_bad_samples)
    if not streaming and len(dataset) == 0:
        raise ValueError(f"No usable samples in {path_or_spec!r} (layout {layout!r}).")
    return dataset.select_columns([name for name in COLUMN_ORDER if name in dataset.column_names])


def detect_layout(path_or_spec) -> str:
    if isinstance(path_or_spec, dict):
        if str(path_or_spec.get("captions", "")).endswith((".jsonl", ".json")):
            return "pointllm"
        shapes = Path(path_or_spec.get("shapes", ""))
        return "hunyuan3d" if shapes.is_dir() and next(shapes.rglob(f"*{SURFACE_SUFFIX}"), None) else "cap3d"
    path = Path(path_or_spec)
    if path.is_file() and path.suffix == ".parquet" or "*" in str(path_or_spec):
        return "parquet"
    if path.is_dir():
        # `metadata.parquet` next to mesh files is a mesh folder's metadata, not a parquet data set.
        if glob.glob(str(path / "**" / "metadata.*"), recursive=True):
            return "meshfolder"
        top_parquet = sorted(path.glob("*.parquet"))
        if top_parquet:
            import pyarrow.parquet as pq

            return "cgmllm_t500k" if is_t500k_schema(pq.read_schema(top_parquet[0]).names) else "parquet"
        if glob.glob(str(path / "**" / "*.parquet"), recursive=True):
            return "parquet"
        if (path / "8192_npy").is_dir() and list(path.glob("*.jsonl")):
            return "pointllm"
        if glob.glob(str(path / "*.csv")):
            surfaces = next(iter(path.rglob(f"*{SURFACE_SUFFIX}")), None)
            return "hunyuan3d" if surfaces is not None else "cap3d"
    raise ValueError(
        f"Cannot tell the layout of {path_or_spec!r}: expected a mesh folder with metadata.csv/jsonl/parquet, a Cap3D "
        "or Hunyuan3D-2.1 folder (uid,caption CSV + shapes), a CG-MLLM t500k or other parquet folder, or a PointLLM "
        "folder (*.jsonl + 8192_npy/). Pass `layout=` explicitly."
    )


# ----------------------------------------------------------------------------------------------------------------
# Shared machinery: derived columns, bad-sample screening, warnings
# ----------------------------------------------------------------------------------------------------------------
def _derive(dataset, function, inputs, features: Features, keep=(), num_proc=None, desc=None, files=None):
    """Columns computed by `function(batch)` from the `inputs` columns, next to the untouched `keep` columns.

    On a `Dataset` only the derived columns are written (the kept ones, e.g. surface bytes or views, are joined
    without being copied); on an `IterableDataset` everything is computed as it is iterated. `files`: the shape files
    `function` reads, when `datasets` does not know them (they are not the data files it loaded): their sizes and
    modification times enter the cache fingerprint, so that a changed file is read again, never served stale.
    """
    keep = [name for name in keep if name in dataset.column_names]
    if not isinstance(dataset, IterableDataset) and len(dataset) == 0:  # `map` of nothing yields no columns
        return Dataset.from_dict({name: [] for name in features}, features=features)
    if isinstance(dataset, IterableDataset):
        kept = Features({name: dataset.features[name] for name in keep})
        drop = [name for name in dataset.column_names if name not in keep]
        return dataset.map(function, batched=True, remove_columns=drop, features=Features({**features, **kept}))
    source = dataset.select_columns(list(inputs))
    fingerprint = None
    if files is not None:
        from datasets.fingerprint import Hasher

        fingerprint = Hasher.hash([source._fingerprint, function, features, _files_signature(files)])
    derived = source.map(function, batched=True, remove_columns=list(inputs), features=features, num_proc=num_proc,
                         desc=desc, new_fingerprint=fingerprint)
    return concatenate_datasets([derived, dataset.select_columns(keep)], axis=1) if keep else derived


def _files_signature(paths) -> str:
    """A hash of the files' paths, sizes and modification times (one `stat` each)."""
    from datasets.fingerprint import Hasher

    stats = []
    for path in sorted(paths):
        try:
            info = os.stat(path)
            stats.append((path, info.st_size, info.st_mtime_ns))
        except OSError:
            stats.append((path, None, None))
    return Hasher.hash(stats)


def _known_features(dataset):
    """A streamed json / parquet set learns its columns from its first rows (`datasets`' own resolution), so that
    the readers can check them before iterating."""
    if isinstance(dataset, IterableDataset) and dataset.features is None:
        return dataset._resolve_features()
    return dataset


def _name_list(names) -> str:
    names = list(names)
    shown = ", ".join(str(name) for name in names[:MAX_NAMED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > MAX_NAMED else "")


def _screen(dataset, skip_bad_samples: bool):
    """Raise on (or drop with a warning) the rows whose `_error` is set, then drop the `_error` column."""
    hint = " Pass skip_bad_samples=True to drop such samples with a warning."
    if isinstance(dataset, IterableDataset):
        def keep(example):
            if example["_error"] is None:
                return True
            message = f"Bad sample {example['uid']!r}: {example['_error']}."
            if not skip_bad_samples:
                raise ValueError(message + hint)
            logger.warning("Skipping %s", message)
            return False

        return dataset.filter(keep).remove_columns("_error")
    bad = dataset.select_columns(["uid", "_error"]).filter(lambda errors: [e is not None for e in errors],
                                                           input_columns="_error", batched=True)
    if len(bad):
        if not skip_bad_samples:
            raise ValueError(f"Bad sample {bad[0]['uid']!r}: {bad[0]['_error']}." +
                             (f" ({len(bad)} bad samples in all.)" if len(bad) > 1 else "") + hint)
        for uid, error in zip(bad["uid"][:MAX_NAMED], bad["_error"][:MAX_NAMED]):
            logger.warning("Skipping bad sample %r: %s.", uid, error)
        if len(bad) > MAX_NAMED:
            logger.warning("Skipping %d more bad samples.", len(bad) - MAX_NAMED)
        dataset = dataset.filter(lambda errors: [e is None for e in errors], input_columns="_error", batched=True)
    return dataset.remove_columns("_error")


def _shape_error(kind: str, value) -> str | None:
    """Why the shape of one row cannot be read, or None (the `validate=True` check)."""
    try:
        if kind == "mesh":
            from cgmllm.mesh_utils import load_mesh

            load_mesh(_mesh_source(value))
        elif kind == "surface_file":
            read_surface_npz(value)
    except ValueError as exc:
        return f"unreadable shape: {exc}"
    return None


# ----------------------------------------------------------------------------------------------------------------
# meshfolder (the `datasets` builder)
# ----------------------------------------------------------------------------------------------------------------
def _metadata_file_names(meta: Path) -> list[str]:
    import pandas as pd

    if meta.suffix == ".csv":
        names = pd.read_csv(meta, usecols=lambda column: column == "file_name", dtype=str, keep_default_na=False)
    elif meta.suffix == ".jsonl":
        names = pd.read_json(meta, lines=True, dtype=False)
    else:
        import pyarrow.parquet as pq

        if "file_name" not in pq.read_schema(meta).names:
            raise ValueError(f"{meta} has no `file_name` column.")
        return pq.read_table(meta, columns=["file_name"]).column("file_name").to_pylist()
    if "file_name" not in names.columns:
        raise ValueError(f"{meta} has no `file_name` column.")
    return [str(name) for name in names["file_name"]]


def _warn_unnamed_mesh_files(root: Path, metadata_files: list[Path]) -> None:
    """Mesh files that no metadata row names are not part of the data set: say which (issue: silently dropped)."""
    named = {os.path.normpath(meta.parent / name) for meta in metadata_files for name in _metadata_file_names(meta)}
    unnamed = sorted(str(path.relative_to(root)) for path in root.rglob("*")
                     if path.suffix.lower() in MESH_SUFFIXES and os.path.normpath(path) not in named)
    if unnamed:
        logger.warning("%d mesh file(s) under %s are named by no metadata row and are left out of the data set: %s",
                       len(unnamed), root, _name_list(unnamed))


def _image_source(value, metadata_dirs: list[str], mesh_path: str):
    """A metadata image entry -> `Image()` input: embedded `{"bytes", "path"}`, or a file name relative to the
    metadata file that names the mesh (made absolute, as the builder makes the mesh paths)."""
    if value is None or isinstance(value, dict) and not (value.get("bytes") or value.get("path")):
        return None
    if isinstance(value, dict):
        if value.get("bytes"):
            return {"bytes": bytes(value["bytes"]), "path": None}
        value = value["path"]
    folder = next((d for d in metadata_dirs if mesh_path.startswith(d + os.sep)), metadata_dirs[0])
    return {"bytes": None, "path": os.path.join(folder, str(value))}


def _meshfolder(folder, caption_column, split, image_column, validate, streaming, num_proc):
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"Mesh folder {folder} does not exist.")
    # A `folder/<split>/` subfolder (the tiny world, `datasets`' split layout) holds that split only.
    root = folder / split if (folder / split).is_dir() else folder
    metadata_files = sorted(p for p in root.rglob("metadata.*") if p.suffix in (".csv", ".jsonl", ".parquet"))
    if not metadata_files:
        raise ValueError(f"{root} has no metadata.csv / metadata.jsonl / metadata.parquet with `file_name` and "
                         f"{caption_column!r}.")
    _warn_unnamed_mesh_files(root, metadata_files)
    built = load_dataset("meshfolder", data_dir=str(folder), split=split, streaming=streaming)
    if caption_column not in built.column_names:
        raise ValueError(f"{metadata_files[0]} has no caption column {caption_column!r} "
                         f"(columns: {sorted(c for c in built.column_names if c != 'mesh')}).")
    built = built.cast_column("mesh", Mesh(decode=False))
    with_image = bool(image_column) and image_column in built.column_names
    if with_image and isinstance(built.features[image_column], Image):
        built = built.cast_column(image_column, Image(decode=False))
    with_paraphrases = PARAPHRASE_COLUMN in built.column_names
    metadata_dirs = sorted({str(meta.parent) for meta in metadata_files}, key=len, reverse=True)

    features = Features({"uid": Value("string"), "caption": Value("string"), "mesh": Mesh(decode=False)})
    if with_paraphrases:
        features[PARAPHRASE_COLUMN] = List(Value("string"))
    if with_image:
        features["image"] = Image()
    features["_error"] = Value("string")

    def rows(batch):
        out = {name: [] for name in features}
        for i, mesh in enumerate(batch["mesh"]):
            path = mesh["path"]
            error = None if mesh.get("bytes") or os.path.isfile(path) else f"mesh file {path} is missing"
            caption = batch[caption_column][i]
            if error is None and (not isinstance(caption, str) or not caption.strip()):
                error = "empty caption"
            out["uid"].append(Path(path).stem)
            out["caption"].append(caption if isinstance(caption, str) else None)
            out["mesh"].append(mesh)
            if with_paraphrases:
                out[PARAPHRASE_COLUMN].append([str(t) for t in (batch[PARAPHRASE_COLUMN][i] or [caption]) if t])
            if with_image:
                image = _image_source(batch[image_column][i], metadata_dirs, path)
                if error is None and image and image["path"] and not os.path.isfile(image["path"]):
                    error = f"image file {image['path']} is missing"
                if error is None and image and validate:
                    error = _image_error(image)
                out["image"].append(image)
            if error is None and validate:
                error = _shape_error("mesh", mesh)
            out["_error"].append(error)
        return out

    inputs = ["mesh", caption_column] + [PARAPHRASE_COLUMN] * with_paraphrases + [image_column] * with_image
    return _derive(built, rows, list(dict.fromkeys(inputs)), features, num_proc=num_proc, desc="Reading meshes")


# ----------------------------------------------------------------------------------------------------------------
# Cap3D / Hunyuan3D-2.1: a header-less uid,caption CSV + shape files named by uid
# ----------------------------------------------------------------------------------------------------------------
def _captions_and_shapes(spec, pattern: str, shapes_of, what: str) -> tuple[Path, Path]:
    """`{"captions": FILE, "shapes": DIR}`, or a folder holding exactly one `pattern` file (its shape folder is
    `shapes_of(folder)`) -> both paths, checked."""
    if isinstance(spec, dict):
        unknown = set(spec) - {"captions", "shapes"}
        if unknown:
            raise ValueError(f"Unknown data spec keys {sorted(unknown)}; expected 'captions' and 'shapes'.")
        captions, shapes = Path(spec["captions"]), Path(spec["shapes"])
    else:
        folder = Path(spec)
        found = sorted(folder.glob(pattern))
        if len(found) != 1:
            raise ValueError(f"A {what} folder must hold exactly one {pattern} file; {folder} has {len(found)}. Pass "
                             "{'captions': FILE, 'shapes': DIR} instead.")
        captions, shapes = found[0], shapes_of(folder)
    if not captions.is_file():
        raise ValueError(f"Caption file {captions} does not exist.")
    if not shapes.is_dir():
        raise ValueError(f"Shape folder {shapes} does not exist.")
    return captions, shapes


def _shape_index(shapes: Path, layout: str) -> tuple[dict[str, str], str]:
    """uid -> file and the shape column: `<uid>.<mesh ext>` / `<uid>.npy` (Cap3D, flat) or `<uid>_surface.npz`
    (Hunyuan3D-2.1, recursive)."""
    index, kinds = {}, set()
    if layout == "hunyuan3d":
        for path in sorted(shapes.rglob(f"*{SURFACE_SUFFIX}")):
            index.setdefault(path.name[: -len(SURFACE_SUFFIX)], str(path))
        kinds.add("surface_file")
    else:
        for name in sorted(os.listdir(shapes)):
            stem, suffix = os.path.splitext(name)
            kind = "mesh" if suffix.lower() in MESH_SUFFIXES else "points" if suffix.lower() in POINT_SUFFIXES else None
            if kind and stem not in index:
                index[stem] = os.path.join(shapes, name)
                kinds.add(kind)
    if len(kinds) > 1:
        raise ValueError(f"{shapes} mixes meshes and .npy point clouds; use one kind per data set.")
    if not index:
        wanted = f"<uid>{SURFACE_SUFFIX} files" if layout == "hunyuan3d" else "meshes or .npy point clouds"
        raise ValueError(f"{shapes} holds no {wanted}.")
    return index, kinds.pop()


def _hunyuan3d_views(index: dict[str, str]) -> dict[str, list[str]]:
    """uid -> the `*.png` renders of Hunyuan3D-2.1's `<uid>/render_cond/` next to `<uid>/geo_data/` (if any)."""
    views = {}
    for uid, surface_file in index.items():
        folder = Path(surface_file).parent.parent / "render_cond"
        if Path(surface_file).parent.name == "geo_data" and folder.is_dir():
            views[uid] = sorted(str(path) for path in folder.glob("*.png"))
    return {uid: paths for uid, paths in views.items() if paths}


def _clean_caption_table(captions, streaming: bool):
    """Cap3D: keep the first row of a duplicated uid and drop `NA` / `nan` / empty captions, warning with the uids."""
    if streaming:
        seen = set()

        def keep(example):
            uid = example["uid"]
            if uid in seen:
                logger.warning("Duplicate uid %r in the caption file: keeping its first row.", uid)
                return False
            seen.add(uid)
            if is_missing_caption(example["caption"]):
                logger.warning("Dropping uid %r: its caption is %r (no caption).", uid, example["caption"])
                return False
            return True

        return captions.filter(keep)
    import pandas as pd

    table = captions.to_pandas() if len(captions) else pd.DataFrame({"uid": [], "caption": []})
    duplicated = table["uid"].duplicated(keep="first").to_numpy()
    missing = table["caption"].map(is_missing_caption).to_numpy() & ~duplicated
    if duplicated.any():
        uids = table["uid"][duplicated].unique()
        logger.warning("%d uid(s) appear more than once in the caption file; keeping each one's first row: %s",
                       len(uids), _name_list(uids))
    if missing.any():
        logger.warning("Dropping %d row(s) whose caption is empty, NA or nan: %s", int(missing.sum()),
                       _name_list(table["uid"][missing]))
    if duplicated.any() or missing.any():
        captions = captions.select(np.flatnonzero(~(duplicated | missing)))
    return captions


def _captioned_shapes(spec, layout, validate, streaming, num_proc):
    csv_path, shapes = _captions_and_shapes(spec, "*.csv", lambda f: f / "shapes" if (f / "shapes").is_dir() else f,
                                            "Cap3D / Hunyuan3D")
    index, kind = _shape_index(shapes, layout)
    captions = load_dataset("csv", data_files=str(csv_path), column_names=["uid", "caption"], split="train",
                            keep_default_na=False, streaming=streaming,
                            features=Features({"uid": Value("string"), "caption": Value("string")}))
    if not streaming:
        unnamed = sorted(set(index) - set(captions["uid"]))
        if unnamed:
            logger.warning("%d shape file(s) in %s have no caption row and are left out: %s", len(unnamed), shapes,
                           _name_list(index[uid] for uid in unnamed))
    captions = _clean_caption_table(captions, streaming)
    if kind == "points":
        channels = np.load(next(iter(index.values())), mmap_mode="r").shape[-1]
        shape_feature = Array2D((None, channels), "float32")
    else:
        shape_feature = {"mesh": Mesh(decode=False), "surface_file": Value("string")}[kind]
    features = Features({"uid": Value("string"), "caption": Value("string"), kind: shape_feature,
                         "_error": Value("string")})
    views = _hunyuan3d_views(index) if layout == "hunyuan3d" else {}
    if views:
        features["images"] = List(Image())

    def rows(batch):
        out = {name: [] for name in features}
        for uid, caption in zip(batch["uid"], batch["caption"]):
            file, value, error = index.get(uid), None, None
            if file is None:
                error = f"no {kind} file for {uid} in {shapes}"
            elif kind == "points":
                try:
                    value = load_points(file, channels)
                except ValueError as exc:
                    error = f"unreadable shape: {exc}"
            else:
                value = {"path": file, "bytes": None} if kind == "mesh" else file
                error = _shape_error(kind, value) if validate else None
            for name, item in (("uid", uid), ("caption", caption), (kind, value), ("_error", error)):
                out[name].append(item)
            if views:
                out["images"].append([{"path": view, "bytes": None} for view in views.get(uid, [])])
        return out

    return _derive(captions, rows, ["uid", "caption"], features, num_proc=num_proc, desc="Matching shapes",
                   files=index.values())


# ----------------------------------------------------------------------------------------------------------------
# parquet with meshes; the official t500k parquet folders; PointLLM
# ----------------------------------------------------------------------------------------------------------------
def _parquet(path, caption_column, mesh_column, validate, streaming, num_proc):
    path = str(path)
    files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)) if os.path.isdir(path) else path
    if not files:
        raise ValueError(f"No parquet files under {path}.")
    table = _known_features(load_dataset("parquet", data_files=files, split="train", streaming=streaming))
    for column in (caption_column, mesh_column):
        if column not in table.column_names:
            raise ValueError(f"Parquet data {path} has no column {column!r} (columns: {table.column_names}).")
    if isinstance(table.features[mesh_column], Mesh):
        table = table.cast_column(mesh_column, Mesh(decode=False))
    with_uid = "uid" in table.column_names
    features = Features({"uid": Value("string"), "caption": Value("string"), "mesh": Mesh(decode=False),
                         "_error": Value("string")})

    def rows(batch, indices):
        out = {name: [] for name in features}
        for i, (mesh, caption) in enumerate(zip(batch[mesh_column], batch[caption_column])):
            if isinstance(mesh, (bytes, bytearray)):
                mesh = {"bytes": bytes(mesh), "path": None}
            error = None if mesh and (mesh.get("bytes") or mesh.get("path")) else "no mesh bytes"
            if error is None and (not isinstance(caption, str) or not caption.strip()):
                error = "empty caption"
            if error is None and validate:
                error = _shape_error("mesh", mesh)
            out["uid"].append(str(batch["uid"][i]) if with_uid else str(indices[i]))
            out["caption"].append(caption if isinstance(caption, str) else None)
            out["mesh"].append(mesh if error is None or mesh else None)
            out["_error"].append(error)
        return out

    inputs = list(dict.fromkeys([mesh_column, caption_column] + ["uid"] * with_uid))
    if isinstance(table, IterableDataset):
        return table.map(rows, batched=True, with_indices=True, remove_columns=table.column_names, features=features)
    return table.select_columns(inputs).map(rows, batched=True, with_indices=True, remove_columns=inputs,
                                            features=features, num_proc=num_proc, desc="Reading meshes")


def _t500k(folder, validate, streaming, num_proc):
    table = _known_features(load_dataset("parquet", data_files=t500k_files(folder), split="train",
                                         streaming=streaming))
    missing = [name for name in ("uid", "image_list", "surface") if name not in table.column_names]
    if missing:
        raise ValueError(f"{folder} is not a CG-MLLM t500k folder: its parquet files lack {missing} (columns: "
                         f"{table.column_names}; expected uid, image_list, surface and optionally captions).")
    table = table.rename_column("image_list", "images").cast_column("images", List(Image()))
    features = Features({"uid": Value("string"), "caption": Value("string"),
                         PARAPHRASE_COLUMN: List(Value("string")), "_error": Value("string")})
    inputs = [name for name in ("uid", "captions", "surface") if name in table.column_names]
    dataset = _derive(table, lambda batch: t500k_text_columns(batch, validate), inputs, features,
                      keep=("surface", "images"), num_proc=num_proc, desc="Reading t500k rows")
    if not streaming:
        without = sum(caption is None for caption in dataset["caption"])
        if without:
            logger.info("%d of %d t500k rows have no caption (Sketchfab without `add_sketchfab_captions.py`): they "
                        "serve image -> 3D only.", without, len(dataset))
    return dataset


def _pointllm(spec, validate, streaming, num_proc):
    jsonl, points_dir = _captions_and_shapes(spec, "*.jsonl", lambda f: f / "8192_npy", "PointLLM")
    records = _known_features(load_dataset("json", data_files=str(jsonl), split="train", streaming=streaming))
    missing = [name for name in ("object_id", "conversations") if name not in records.column_names]
    if missing:
        raise ValueError(f"{jsonl} lacks {missing}; expected PointLLM records {{'object_id', 'conversations'}}.")
    features = Features({"uid": Value("string"), "caption": Value("string"), "question": Value("string"),
                         "point_cloud": Array2D((None, 6), "float32"), "_error": Value("string")})
    clouds = [] if streaming else [entry.path for entry in os.scandir(points_dir) if entry.name.endswith(".npy")]
    return _derive(records, lambda batch: pointllm_rows(batch, str(points_dir)), ["object_id", "conversations"],
                   features, num_proc=num_proc, desc="Reading PointLLM clouds", files=clouds)


# ----------------------------------------------------------------------------------------------------------------
# Shapes -> VAE surfaces
# ----------------------------------------------------------------------------------------------------------------
def load_points(path, channels: int | None = None) -> np.ndarray:
    """A `(P, 6|7)` xyz + normal [+ sharp flag] `.npy` cloud as float32 (`channels`: the width all clouds share)."""
    try:
        points = np.load(path)
    except Exception as exc:  # numpy raises several types for corrupt files
        raise ValueError(f"Could not read point cloud {path}: {type(exc).__name__}: {exc}") from exc
    if points.ndim != 2 or points.shape[1] not in (6, 7) or not np.isfinite(points).all():
        raise ValueError(
            f"Point cloud {path} must be a finite (P, 6) or (P, 7) array (xyz + normal [+ sharp]), got "
            f"{points.shape}."
        )
    if channels is not None and points.shape[1] != channels:
        raise ValueError(f"Point cloud {path} has {points.shape[1]} channels, the others {channels}.")
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
    """The `(P, 7)` VAE input of one example (xyz, normal, sharp flag), with the VAE config's counts (`pc_size`
    uniform + `pc_sharpedge_size` sharp, unless `num_points` / `num_sharp_points` override them).

    `mesh` / `points`: drawn by `mesh_utils.sample_vae_surface`, exactly as mesh captioning draws them (a mesh is
    normalised into the VAE cube first). `surface` / `surface_file` (t500k, Hunyuan3D-2.1): drawn from the stored
    surface samples as they are (the official loader normalises nothing; `cgmllm.training.official_data`).
    """
    from cgmllm.mesh_utils import sample_vae_surface, vae_surface_sizes

    if example.get("surface") is not None or example.get("surface_file") is not None:
        uniform, sharp = vae_surface_sizes(vae_config, num_points, num_sharp_points)
        source = example.get("surface")
        arrays = read_surface_npz(bytes(source) if source is not None else example["surface_file"])
        return torch.from_numpy(surface_points(arrays, uniform, sharp, seed, example.get("uid")))
    if example.get("points") is not None:
        source = np.asarray(example["points"], dtype=np.float32)
    elif example.get("point_cloud") is not None:
        raise ValueError(f"Sample {example.get('uid')!r} holds a PointBERT cloud (xyz + rgb, `point_cloud`), not a "
                         "surface with normals: it cannot be encoded by the ShapeVAE.")
    else:
        mesh = example["mesh"]
        source = _mesh_source(mesh) if isinstance(mesh, dict) else mesh
    return sample_vae_surface(source, vae_config, seed=seed, num_points=num_points, num_sharp_points=num_sharp_points)


__all__ = ["LAYOUTS", "SHAPE_COLUMNS", "detect_layout", "example_surface", "load_caption_dataset", "load_points"]
