"""The official CG-MLLM training data, read as released: no conversion script to write.

Three layouts (facts: `shared/reference/official_pointbert_and_data.md`), each read through `datasets` into the
common schema of `cgmllm.training.data` (which dispatches here):

    cgmllm_t500k  `CGMLLM_t500k_{github,sketchfab}` (ModelScope `jreamHuang/...`): a flat folder of `*.parquet` with
                  columns `uid`, `image_list` (list of image bytes), `surface` (npz bytes, key `random_surface`: an
                  (N, 6) float array, xyz + normal) and `captions` (a JSON list, or a list; absent or null in the
                  Sketchfab part until the release's `scripts/add_sketchfab_captions.py` adds it). Rows without a
                  caption get `caption = None` and serve image -> 3D only, as in the official loader.
    hunyuan3d     Hunyuan3D-2.1's preprocessing outputs `<uid>_surface.npz` (`random_surface` and `sharp_surface`,
                  (N, 6) float16 xyz + normal; found recursively, so its `preprocessed/<uid>/geo_data/` tree works as
                  is) with captions from a header-less `uid,caption` CSV (the Cap3D convention). Read by
                  `cgmllm.training.data` (it shares the Cap3D reader); the npz decoding is here.
    pointllm      PointLLM's caption set: `8192_npy/<object_id>_8192.npy` ((8192, 6) xyz + rgb in [0, 1]) and the
                  brief-description jsonl (`{"object_id", "conversations": [{"from": "human", "value":
                  "<point>\\n..."}, {"from": "gpt", "value": caption}]}`). The cloud is stored as `point_cloud`,
                  normalised as the official path does before PointBERT (PointLLM's `pc_norm`:
                  `cgmllm.modeling_pointbert.normalize_point_cloud`).

Coordinates. Shape surfaces are used as they are, as the official loader does (it re-normalises nothing). The
release README says the t500k objects were "processed following the Hunyuan3D-2.1 data pipeline", whose
`watertight_and_sample.py` maps every mesh into [0, 1/1.01]^3 with its minimum corner at the origin (not centred);
Hunyuan3D-2.1's own shipped samples measure about [-0.008, 0.998]^3 (the watertight shell pads a little). So the
t500k surfaces are expected in about [0, 1]^3: inside the VAE decoder's [-1.01, 1.01]^3 box, off-centre. The
range was not measured on the release itself (it cannot be downloaded here); `surface_points` warns, naming the
sample, when a surface leaves the decoder box.
"""

import io
import json
import logging
import os

import numpy as np


logger = logging.getLogger(__name__)

MISSING_CAPTIONS = frozenset({"", "na", "n/a", "nan", "none", "null"})
"""Caption texts that mean "no caption" (pandas' NA spellings as they appear in Cap3D / TRELLIS CSVs)."""
T500K_COLUMNS = ("uid", "image_list", "surface")
SURFACE_SUFFIX = "_surface.npz"
DECODER_BOUND = 1.01
"""Half-width of the ShapeVAE decoder's query box (Hunyuan3D-2.1's `bounds`): geometry outside it is not decoded."""


def is_missing_caption(text) -> bool:
    """None, a non-string (pandas' float NaN) or one of `MISSING_CAPTIONS` (case-insensitive) after stripping."""
    return not isinstance(text, str) or text.strip().lower() in MISSING_CAPTIONS


def parse_caption_list(value) -> list[str]:
    """The t500k `captions` cell -> the usable captions: a JSON list string or a list; null / NaN -> [].

    A cell that is neither a list nor a JSON list raises (the official loader silently drops it instead).
    """
    if value is None or isinstance(value, float):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"`captions` is not a JSON list: {value[:80]!r} ({exc})") from exc
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"`captions` must be a list of strings, got {type(value).__name__}")
    return [text.strip() for text in value if not is_missing_caption(text)]


# ----------------------------------------------------------------------------------------------------------------
# Surfaces (t500k `surface` bytes, Hunyuan3D-2.1 `*_surface.npz` files)
# ----------------------------------------------------------------------------------------------------------------
def read_surface_npz(source, require_sharp: bool = False) -> dict[str, np.ndarray]:
    """npz bytes or a path -> {"random_surface": (N, 6), ["sharp_surface": (M, 6)]} float32 arrays, checked."""
    label = "surface bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        with np.load(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as npz:
            arrays = {key: np.asarray(npz[key]) for key in ("random_surface", "sharp_surface") if key in npz.files}
            keys = list(npz.files)
    except Exception as exc:  # numpy / zipfile raise several types for corrupt data
        raise ValueError(f"Could not read {label} as an npz archive: {type(exc).__name__}: {exc}") from exc
    needed = ("random_surface", "sharp_surface") if require_sharp else ("random_surface",)
    missing = [key for key in needed if key not in arrays]
    if missing:
        raise ValueError(f"{label} has no {missing} array (keys: {keys}).")
    for key, array in arrays.items():
        if array.ndim != 2 or array.shape[1] < 6 or array.shape[0] == 0:
            raise ValueError(f"{label}: `{key}` must be an (N, 6) array of xyz + normal, got {array.shape}.")
        if not np.isfinite(array[:, :6]).all():
            raise ValueError(f"{label}: `{key}` holds non-finite values.")
        arrays[key] = array[:, :6].astype(np.float32)
    return arrays


def _draw(pool: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` rows of `pool`, without replacement when the pool is large enough (the official loader's way)."""
    return pool[rng.choice(pool.shape[0], count, replace=pool.shape[0] < count)]


def surface_points(arrays: dict, num_points: int, num_sharp_points: int, seed: int, uid=None) -> np.ndarray:
    """The `(num_points + num_sharp_points, 7)` VAE input from decoded npz arrays: xyz, unit normal, sharp flag.

    Uniform points come from `random_surface` (flag 0), sharp-edge points from `sharp_surface` (flag 1). Without a
    `sharp_surface` (the t500k release) every point comes from `random_surface` with flag 0, as the official loader
    builds it. Normals are L2-normalised (stored as float16 they are not unit length); xyz is kept as is.
    """
    rng = np.random.default_rng(seed)
    sharp = arrays.get("sharp_surface")
    if sharp is None or num_sharp_points == 0:
        parts = [(_draw(arrays["random_surface"], num_points + num_sharp_points, rng), 0.0)]
    else:
        parts = [(_draw(arrays["random_surface"], num_points, rng), 0.0), (_draw(sharp, num_sharp_points, rng), 1.0)]
    rows = []
    for points, flag in parts:
        normals = points[:, 3:6] / np.maximum(np.linalg.norm(points[:, 3:6], axis=1, keepdims=True), 1e-12)
        rows.append(np.concatenate([points[:, :3], normals, np.full((len(points), 1), flag, np.float32)], axis=1))
    surface = np.concatenate(rows).astype(np.float32)
    extent = float(np.abs(surface[:, :3]).max())
    if extent > DECODER_BOUND:
        logger.warning("Sample %r: surface coordinates reach %.3f, outside the ShapeVAE decoder box [-%.2f, %.2f]^3; "
                       "the loader does not re-normalise (as the official one).", uid, extent, DECODER_BOUND,
                       DECODER_BOUND)
    return surface


# ----------------------------------------------------------------------------------------------------------------
# CG-MLLM t500k parquet folders
# ----------------------------------------------------------------------------------------------------------------
def t500k_files(folder) -> list[str]:
    """The `*.parquet` files of a t500k folder (flat, sorted, as the official `get_parquet_data_paths`)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"CG-MLLM t500k folder {folder} does not exist.")
    files = sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".parquet"))
    if not files:
        raise ValueError(f"{folder} holds no *.parquet files (expected the CGMLLM_t500k_* release layout).")
    return files


def is_t500k_schema(names) -> bool:
    return set(T500K_COLUMNS) <= set(names)


def t500k_text_columns(batch: dict, validate: bool) -> dict:
    """A batch of t500k rows -> `uid`, `caption`, `captions`, `_error` (the surface and views stay untouched)."""
    out = {"uid": [], "caption": [], "captions": [], "_error": []}
    captions_column = batch.get("captions", [None] * len(batch["uid"]))
    for uid, captions, surface in zip(batch["uid"], captions_column, batch["surface"]):
        error = None
        try:
            texts = parse_caption_list(captions)
        except ValueError as exc:
            texts, error = [], str(exc)
        if error is None and not surface:
            error = "no `surface` bytes"
        if error is None and validate:
            try:
                read_surface_npz(bytes(surface))
            except ValueError as exc:
                error = f"unreadable surface: {exc}"
        out["uid"].append(str(uid))
        out["caption"].append(texts[0] if texts else None)
        out["captions"].append(texts)
        out["_error"].append(error)
    return out


# ----------------------------------------------------------------------------------------------------------------
# PointLLM caption set
# ----------------------------------------------------------------------------------------------------------------
POINTLLM_PLACEHOLDER = "<point>"


def load_pointllm_cloud(path) -> np.ndarray:
    """`<id>_8192.npy` -> the `(P, 6)` float32 xyz + rgb cloud, normalised for PointBERT."""
    try:
        cloud = np.load(path)
    except Exception as exc:  # numpy raises several types for corrupt files
        raise ValueError(f"Could not read point cloud {path}: {type(exc).__name__}: {exc}") from exc
    if cloud.ndim != 2 or cloud.shape[1] != 6 or not np.isfinite(cloud).all():
        raise ValueError(f"Point cloud {path} must be a finite (P, 6) xyz + rgb array, got shape {cloud.shape}.")
    if np.ptp(cloud[:, :3], axis=0).max() == 0:
        raise ValueError(f"Point cloud {path}: all points coincide, it cannot be normalised.")
    import torch

    from cgmllm.modeling_pointbert import normalize_point_cloud  # PointLLM's `pc_norm`, as the pipeline applies it

    return normalize_point_cloud(torch.from_numpy(cloud.astype(np.float32))).numpy()


def pointllm_turns(conversations) -> tuple[str | None, str | None]:
    """The first human turn (the `<point>` placeholder removed) and the first gpt turn of a PointLLM record."""
    question = answer = None
    for turn in conversations or ():
        speaker, text = turn.get("from"), turn.get("value")
        if speaker == "human" and question is None and isinstance(text, str):
            question = text.replace(POINTLLM_PLACEHOLDER, "").strip() or None
        elif speaker == "gpt" and answer is None and isinstance(text, str):
            answer = text.strip()
    return question, answer


def pointllm_rows(batch: dict, points_dir: str) -> dict:
    """A batch of jsonl records -> `uid`, `caption`, `question`, `point_cloud`, `_error`."""
    out = {"uid": [], "caption": [], "question": [], "point_cloud": [], "_error": []}
    for object_id, conversations in zip(batch["object_id"], batch["conversations"]):
        uid = str(object_id)
        question, caption = pointllm_turns(conversations)
        cloud, error = None, None
        if caption is None or is_missing_caption(caption):
            error = "no gpt turn (caption) in `conversations`"
        else:
            path = os.path.join(points_dir, f"{uid}_8192.npy")
            if not os.path.isfile(path):
                error = f"point cloud {path} is missing"
            else:
                try:
                    cloud = load_pointllm_cloud(path)
                except ValueError as exc:
                    error = str(exc)
        out["uid"].append(uid)
        out["caption"].append(caption)
        out["question"].append(question)
        out["point_cloud"].append(cloud)
        out["_error"].append(error)
    return out


__all__ = [
    "DECODER_BOUND",
    "MISSING_CAPTIONS",
    "is_missing_caption",
    "load_pointllm_cloud",
    "parse_caption_list",
    "read_surface_npz",
    "surface_points",
]
