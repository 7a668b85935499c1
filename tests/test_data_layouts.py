"""The official data layouts (CG-MLLM t500k, Hunyuan3D-2.1 surfaces, PointLLM) through `load_caption_dataset`,
`cgmllm-preprocess` and the collator, on small files written in exactly those layouts; streaming; Arrow features;
the warnings for dropped files and Cap3D rows (issue 18 item 8)."""

import io
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from datasets import Array2D, Dataset, IterableDataset, List, Image, load_from_disk
from PIL import Image as PILImage

from cgmllm.training.collator import CGMLLMDataCollator
from cgmllm.training.data import example_surface, load_caption_dataset
from cgmllm.training.preprocess import encode_dataset
from cgmllm.training.preprocess import main as preprocess_main
from cgmllm.training.testing import primitive_mesh, tiny_vae, write_mesh_folder


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _surface_npz(rng, n: int, dtype=np.float32, sharp: int = 0) -> tuple[bytes, dict]:
    """npz bytes as the releases write them: xyz in [0, 0.99]^3 (Hunyuan3D-2.1 pipeline), unnormalised normals."""
    def cloud(count):
        return np.concatenate([rng.uniform(0.0, 0.99, (count, 3)), rng.normal(size=(count, 3)) * 3], 1).astype(dtype)

    arrays = {"random_surface": cloud(n)}
    if sharp:
        arrays["sharp_surface"] = cloud(sharp)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue(), arrays


def write_t500k_folder(folder: Path, with_captions: bool = True, rows_per_file=(2, 1), points: int = 300) -> dict:
    """A `CGMLLM_t500k_*` folder: flat `*.parquet` shards with uid, image_list, surface (npz bytes) [, captions]."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays, index = {}, 0
    for shard, count in enumerate(rows_per_file):
        frame = {"uid": [], "image_list": [], "surface": []}
        if with_captions:
            frame["captions"] = []
        for _ in range(count):
            uid = f"{index:032x}"
            data, arrays[uid] = _surface_npz(rng, points, np.float16 if index % 2 else np.float32)
            frame["uid"].append(uid)
            frame["image_list"].append([_png(index), _png(index + 100)])
            frame["surface"].append(data)
            if with_captions:
                frame["captions"].append(json.dumps([f"object number {index}", f"thing {index}"]))
            index += 1
        pd.DataFrame(frame).to_parquet(folder / f"{shard:06d}.parquet", index=False)
    return arrays


# 1. CG-MLLM t500k -----------------------------------------------------------------------------------------------------
def test_t500k_folder_loads_as_released_and_surfaces_are_used_as_they_are(tmp_path):
    arrays = write_t500k_folder(tmp_path / "CGMLLM_t500k_github")
    ds = load_caption_dataset(tmp_path / "CGMLLM_t500k_github")
    assert ds.column_names == ["uid", "caption", "captions", "surface", "images"]
    assert ds.features["images"] == List(Image())
    assert ds["caption"] == ["object number 0", "object number 1", "object number 2"]
    assert ds[1]["captions"] == ["object number 1", "thing 1"] and ds[1]["images"][1].size == (24, 16)

    uid = ds[1]["uid"]
    pools = {"pc_size": 200, "pc_sharpedge_size": 0}
    surface = example_surface(ds[1], pools, seed=3).numpy()
    stored = arrays[uid]["random_surface"].astype(np.float32)
    assert surface.shape == (200, 7) and (surface[:, 6] == 0).all()
    # Drawn without replacement from `random_surface`, xyz untouched (no re-normalisation), normals made unit length.
    rows = [int(np.flatnonzero((stored[:, :3] == p).all(1))[0]) for p in surface[:, :3]]
    assert len(set(rows)) == 200
    np.testing.assert_allclose(np.linalg.norm(surface[:, 3:6], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(surface[:, 3:6] * np.linalg.norm(stored[rows, 3:6], axis=1, keepdims=True),
                               stored[rows, 3:6], rtol=1e-5, atol=1e-6)
    assert np.array_equal(example_surface(ds[1], pools, seed=3), example_surface(ds[1], pools, seed=3))


def test_t500k_sketchfab_without_captions_serves_image_to_shape_only(tmp_path, processor):
    write_t500k_folder(tmp_path / "sketchfab", with_captions=False)
    ds = load_caption_dataset(tmp_path / "sketchfab", layout="cgmllm_t500k")
    assert ds["caption"] == [None, None, None] and ds["captions"] == [[], [], []]
    cache = encode_dataset(ds, tiny_vae(), 4)
    assert cache.column_names == ["uid", "caption", "captions", "images", "latents"]
    collator = CGMLLMDataCollator(processor, 4, task_weights={"text_to_shape": 1.0, "image_to_shape": 1.0,
                                                              "shape_caption": 1.0}, condition_dropout=0.0)
    samples = [collator.build_sample(example) for example in cache]
    assert {sample["task"] for sample in samples} == {"image_to_shape"}
    batch = collator(list(cache))
    assert batch["pixel_values"].shape[0] > 0 and batch["shape_latents"].shape == (12, 8)
    with pytest.raises(ValueError, match="fits none of the tasks.*no caption"):
        CGMLLMDataCollator(processor, 4, task_weights={"text_to_shape": 1.0})(list(cache))


def test_t500k_after_the_caption_script_and_bad_rows(tmp_path, caplog):
    # `add_sketchfab_captions.py` left-joins TRELLIS' csv: unmatched uids get a null `captions` cell.
    folder = tmp_path / "sketchfab"
    write_t500k_folder(folder, with_captions=False, rows_per_file=(3,))
    frame = pd.read_parquet(folder / "000000.parquet")
    frame["aesthetic_score"] = [5.0, None, 4.0]
    frame["captions"] = [json.dumps(["a chair"]), None, json.dumps(["nan", "a lamp"])]
    frame.to_parquet(folder / "000000.parquet", index=False)
    ds = load_caption_dataset(folder)
    assert ds["caption"] == ["a chair", None, "a lamp"]

    frame.loc[1, "captions"] = "not json"
    frame.loc[2, "surface"] = b"not an npz"
    frame.to_parquet(folder / "000000.parquet", index=False)
    with pytest.raises(ValueError, match=r"Bad sample '0{31}1': `captions` is not a JSON list.*2 bad samples"):
        load_caption_dataset(folder)
    with caplog.at_level(logging.WARNING):
        ds = load_caption_dataset(folder, skip_bad_samples=True)
    assert len(ds) == 1 and "unreadable surface" in caplog.text


def test_t500k_streaming_and_the_preprocess_cli(tmp_path, processor):
    folder = tmp_path / "CGMLLM_t500k_github"
    write_t500k_folder(folder)
    stream = load_caption_dataset(folder, streaming=True)
    assert isinstance(stream, IterableDataset)
    eager = load_caption_dataset(folder)
    assert [row["uid"] for row in stream] == eager["uid"]
    assert [row["captions"] for row in stream] == eager["captions"]

    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    outputs = {}
    for flag in ([], ["--streaming"]):
        out = tmp_path / f"cache{len(flag)}"
        outputs[bool(flag)] = preprocess_main(["--data", str(folder), "--shape-vae", str(tmp_path / "vae"),
                                               "--num-latents", "4", "--out", str(out)] + flag)
    streamed, eager_cache = outputs[True], outputs[False]
    assert streamed.column_names == ["uid", "caption", "captions", "images", "latents"]
    assert not any(p.name.startswith(".cgmllm-preprocess") for p in tmp_path.iterdir())  # staging removed
    np.testing.assert_allclose(np.asarray(streamed["latents"]), np.asarray(eager_cache["latents"]), atol=1e-6)
    batch = CGMLLMDataCollator(processor, 4, task_weights={"image_to_shape": 1.0}, condition_dropout=0.0)(
        list(load_from_disk(str(tmp_path / "cache1"))))
    assert int((batch["input_ids"] == processor.special_token_ids["image_token_id"]).sum()) > 0


# 2. Hunyuan3D-2.1 preprocessing outputs ------------------------------------------------------------------------------
def write_hunyuan3d_tree(root: Path, uids, points=400, sharp=100) -> dict:
    """`preprocessed/<uid>/geo_data/<uid>_surface.npz` (+ `_sdf.npz`, `_watertight.obj`) and a uid,caption csv."""
    rng = np.random.default_rng(1)
    arrays = {}
    for uid in uids:
        geo = root / "preprocessed" / uid / "geo_data"
        geo.mkdir(parents=True)
        data, arrays[uid] = _surface_npz(rng, points, np.float16, sharp=sharp)
        (geo / f"{uid}_surface.npz").write_bytes(data)
        np.savez(geo / f"{uid}_sdf.npz", vol_points=np.zeros((4, 3), np.float16))
        primitive_mesh("box").export(geo / f"{uid}_watertight.obj")
    (root / "captions.csv").write_text("".join(f"{uid},a shape called {uid}\n" for uid in uids))
    return arrays


def test_hunyuan3d_surfaces_fill_the_uniform_and_sharp_pools(tmp_path):
    arrays = write_hunyuan3d_tree(tmp_path, ["a1", "b2"])
    ds = load_caption_dataset(tmp_path)
    assert ds.column_names == ["uid", "caption", "surface_file"] and ds["caption"][1] == "a shape called b2"
    surface = example_surface(ds[0], {"pc_size": 64, "pc_sharpedge_size": 32}, seed=0).numpy()
    assert surface.shape == (96, 7)
    assert (surface[:64, 6] == 0).all() and (surface[64:, 6] == 1).all()
    stored = {key: value.astype(np.float32) for key, value in arrays["a1"].items()}
    for rows, key in ((surface[:64], "random_surface"), (surface[64:], "sharp_surface")):
        assert all((stored[key][:, :3] == p).all(1).any() for p in rows[:, :3]), key
    np.testing.assert_allclose(np.linalg.norm(surface[:, 3:6], axis=1), 1.0, atol=1e-5)

    cache = encode_dataset(ds, tiny_vae(), 4)  # the tiny VAE: 256 uniform points, no sharp pool
    assert np.isfinite(np.asarray(cache["latents"])).all() and np.asarray(cache["latents"]).shape == (2, 4, 8)


def test_hunyuan3d_render_views_become_images_and_a_spec_is_detected(tmp_path, processor):
    write_hunyuan3d_tree(tmp_path, ["a1", "b2"])
    renders = tmp_path / "preprocessed" / "a1" / "render_cond"
    renders.mkdir()
    for index in (1, 0):
        (renders / f"{index:03d}.png").write_bytes(_png(index))
    (renders / "transforms.json").write_text("{}")
    ds = load_caption_dataset({"captions": tmp_path / "captions.csv", "shapes": tmp_path / "preprocessed"})
    assert ds.column_names == ["uid", "caption", "surface_file", "images"]
    assert [image.size for image in ds[0]["images"]] == [(24, 16), (24, 16)] and ds[1]["images"] == []
    assert np.array_equal(np.asarray(ds[0]["images"][0]), np.asarray(PILImage.open(io.BytesIO(_png(0)))))
    cache = encode_dataset(ds, tiny_vae(), 4)
    collator = CGMLLMDataCollator(processor, 4, task_weights={"image_to_shape": 1.0, "text_to_shape": 1.0},
                                  condition_dropout=0.0)
    assert {collator.build_sample(row)["task"] for row in cache.select([1])} == {"text_to_shape"}  # no views
    assert collator(list(cache))["shape_latents"].shape == (8, 8)


def test_hunyuan3d_bad_npz_is_named(tmp_path):
    write_hunyuan3d_tree(tmp_path, ["a1", "b2"])
    np.savez(tmp_path / "preprocessed" / "b2" / "geo_data" / "b2_surface.npz", other=np.zeros(3))
    with pytest.raises(ValueError, match=r"Bad sample 'b2': unreadable shape: .*no \['random_surface'\]"):
        load_caption_dataset(tmp_path, layout="hunyuan3d")


# 3. PointLLM ----------------------------------------------------------------------------------------------------------
def write_pointllm_folder(root: Path, ids, num_points=8192) -> dict:
    (root / "8192_npy").mkdir(parents=True)
    rng = np.random.default_rng(2)
    clouds = {}
    with open(root / "PointLLM_brief_description_660K_filtered.jsonl", "w") as handle:
        for i, object_id in enumerate(ids):
            xyz, rgb = rng.normal(3.0, 2.0, (num_points, 3)), rng.uniform(0, 1, (num_points, 3))
            clouds[object_id] = np.concatenate([xyz, rgb], 1).astype(np.float32)
            np.save(root / "8192_npy" / f"{object_id}_8192.npy", clouds[object_id])
            record = {"object_id": object_id, "conversations": [
                {"from": "human", "value": "<point>\nWhat is this?" if i % 2 else "Summarize this object.\n<point>"},
                {"from": "gpt", "value": f"A model of object {i}."}], "conversation_type": "simple_description"}
            handle.write(json.dumps(record) + "\n")
    return clouds


def test_pointllm_clouds_are_normalised_for_pointbert(tmp_path):
    clouds = write_pointllm_folder(tmp_path, ["0ea33b6617174530b97d6b7a92c275fb", "ff01"])
    ds = load_caption_dataset(tmp_path)
    assert ds.column_names == ["uid", "caption", "question", "point_cloud"]
    assert ds.features["point_cloud"] == Array2D((None, 6), "float32")
    assert ds["question"] == ["Summarize this object.", "What is this?"] and ds["caption"][1] == "A model of object 1."
    cloud = ds.with_format("numpy")[0]["point_cloud"]
    raw = clouds["0ea33b6617174530b97d6b7a92c275fb"]
    assert cloud.shape == (8192, 6) and cloud.dtype == np.float32
    np.testing.assert_allclose(cloud[:, :3].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(cloud[:, :3], axis=1).max(), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(cloud[:, 3:], raw[:, 3:])  # rgb untouched
    centred = raw[:, :3] - raw[:, :3].mean(0)
    np.testing.assert_allclose(cloud[:, :3], centred / np.linalg.norm(centred, axis=1).max(), atol=1e-5)

    stream = load_caption_dataset({"captions": tmp_path / "PointLLM_brief_description_660K_filtered.jsonl",
                                   "shapes": tmp_path / "8192_npy"}, streaming=True)
    rows = list(stream)
    assert [r["uid"] for r in rows] == ds["uid"]
    np.testing.assert_array_equal(np.asarray(rows[0]["point_cloud"]), cloud)
    with pytest.raises(ValueError, match="PointBERT cloud"):
        example_surface(ds[0], {"pc_size": 16, "pc_sharpedge_size": 0})
    with pytest.raises(ValueError, match="PointBERT clouds .* nothing to encode"):
        encode_dataset(ds, tiny_vae(), 4)


def test_pointllm_missing_cloud_is_named(tmp_path, caplog):
    write_pointllm_folder(tmp_path, ["a", "b"], num_points=32)
    (tmp_path / "8192_npy" / "b_8192.npy").unlink()
    with pytest.raises(ValueError, match=r"Bad sample 'b': point cloud .*b_8192.npy is missing"):
        load_caption_dataset(tmp_path)
    stream = load_caption_dataset(tmp_path, streaming=True)
    with pytest.raises(ValueError, match="Bad sample 'b'"):
        list(stream)
    with caplog.at_level(logging.WARNING):
        assert [r["uid"] for r in load_caption_dataset(tmp_path, streaming=True, skip_bad_samples=True)] == ["a"]
    assert "Skipping Bad sample 'b'" in caplog.text
    (tmp_path / "more.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"A PointLLM folder must hold exactly one \*.jsonl file; .* has 2"):
        load_caption_dataset(tmp_path, layout="pointllm")


# 4. Arrow features, num_proc, streaming of the other layouts ----------------------------------------------------------
def test_cap3d_point_clouds_are_array2d_and_num_proc_gives_the_same_rows(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "shapes").mkdir()
    lines = []
    for i in range(6):
        np.save(tmp_path / "shapes" / f"u{i}.npy", rng.normal(size=(10 + i, 6)).astype(np.float32))
        lines.append(f"u{i},cloud {i}\n")
    (tmp_path / "captions.csv").write_text("".join(lines))
    ds = load_caption_dataset(tmp_path)
    assert ds.features["points"] == Array2D((None, 6), "float32")
    assert isinstance(ds.with_format("numpy")[3]["points"], np.ndarray)
    assert ds.with_format("numpy")[3]["points"].shape == (13, 6)
    parallel = load_caption_dataset(tmp_path, num_proc=2)
    assert parallel["uid"] == ds["uid"]
    for a, b in zip(parallel.with_format("numpy")["points"], ds.with_format("numpy")["points"]):
        np.testing.assert_array_equal(a, b)


def test_meshfolder_and_parquet_stream(tmp_path):
    folder = write_mesh_folder(tmp_path / "m", names=["box", "ball", "cone"])
    stream = load_caption_dataset(folder, streaming=True)
    assert isinstance(stream, IterableDataset) and not isinstance(stream, Dataset)
    assert [row["uid"] for row in stream] == load_caption_dataset(folder)["uid"]

    frame = pd.DataFrame({"caption": ["a box", "a cone", ""],
                          "mesh": [primitive_mesh(name).export(file_type="glb") for name in ("box", "cone", "ball")]})
    frame.to_parquet(tmp_path / "meshes.parquet", index=False)
    rows = list(load_caption_dataset(tmp_path / "meshes.parquet", streaming=True, skip_bad_samples=True))
    assert [row["uid"] for row in rows] == ["0", "1"] and rows[1]["mesh"]["bytes"][:4] == b"glTF"


# 5. Issue 18 item 8: nothing dropped without a word -------------------------------------------------------------------
def test_mesh_files_named_by_no_metadata_row_are_warned_about_by_name(tmp_path, caplog):
    folder = Path(write_mesh_folder(tmp_path / "m", names=["box", "ball"]))
    primitive_mesh("cone").export(folder / "orphan_cone.glb")
    (folder / "sub").mkdir()
    primitive_mesh("box").export(folder / "sub" / "orphan_box.ply")
    with caplog.at_level(logging.WARNING):
        ds = load_caption_dataset(folder)
    assert sorted(ds["uid"]) == ["ball", "box"]
    assert "2 mesh file(s)" in caplog.text and "orphan_cone.glb" in caplog.text
    assert str(Path("sub") / "orphan_box.ply") in caplog.text


def test_cap3d_duplicate_uids_and_na_captions_are_warned_about(tmp_path, caplog):
    (tmp_path / "shapes").mkdir()
    for uid in ("u0", "u1", "u2", "u3", "u4"):
        primitive_mesh("box").export(tmp_path / "shapes" / f"{uid}.glb")
    (tmp_path / "Cap3D_automated_Objaverse_full.csv").write_text(
        "u0,a box\nu1,NA\nu2,nan\nu0,a second caption for u0\nu3,a crate\nu4,\"\"\n")
    with caplog.at_level(logging.WARNING):
        ds = load_caption_dataset(tmp_path)
    assert ds["uid"] == ["u0", "u3"] and ds["caption"] == ["a box", "a crate"]
    assert "keeping each one's first row: u0" in caplog.text
    assert "Dropping 3 row(s) whose caption is empty, NA or nan: u1, u2, u4" in caplog.text


def test_cgmllm_train_streams_a_t500k_folder(tmp_path):
    # `data.streaming: true`: the stages read and encode the parquet rows lazily (an IterableDataset through Trainer).
    from cgmllm.training.cli import train_main

    write_t500k_folder(tmp_path / "t500k", rows_per_file=(3, 2))
    config = Path(__file__).resolve().parents[1] / "training" / "configs" / "example.yaml"
    model, results = train_main(["--config", str(config), "--set", f"data.path={tmp_path / 't500k'}",
                                 "--set", "data.streaming=true", "--set", f"output_dir={tmp_path / 'run'}"])
    assert [r["stage"] for r in results] == ["align", "progressive-4", "progressive-8"]
    assert all(np.isfinite(r["train_loss"]) for r in results)
    assert all(r["log_history"][-1]["step"] == 2 for r in results)


def _tiny_point_encoder():
    import torch

    from cgmllm import PointBERTConfig, PointBERTEncoder

    torch.manual_seed(0)
    config = PointBERTConfig(trans_dim=16, depth=1, num_heads=2, group_size=4, num_group=8, encoder_dims=12)
    return PointBERTEncoder(config).eval().requires_grad_(False)


def test_pointllm_clouds_reach_the_model_as_point_features(tmp_path, processor):
    import torch
    import torch.nn.functional as F

    from cgmllm import CGMLLMForConditionalGeneration
    from cgmllm.training.testing import tiny_model_config

    write_pointllm_folder(tmp_path, ["a", "b"], num_points=64)
    ds = load_caption_dataset(tmp_path)
    with pytest.raises(ValueError, match="'a' is a PointBERT cloud.*point_encoder="):
        CGMLLMDataCollator(processor, 4, task_weights={"shape_caption": 1.0})(list(ds))

    encoder = _tiny_point_encoder()
    collator = CGMLLMDataCollator(processor, 4, task_weights={"shape_caption": 1.0, "text_to_shape": 1.0},
                                  point_encoder=encoder)
    batch = collator(list(ds))  # text -> 3D needs latents: a cloud is only ever captioned
    assert "shape_latents" not in batch and batch["point_features"].shape == (2 * 9, 16)
    pad = processor.special_token_ids["obj_pad_token_id"]
    assert (batch["input_ids"] == pad).sum(1).tolist() == [9, 9]  # 1 + num_group rows per block, not N = 4
    clouds = torch.as_tensor(np.stack(ds.with_format("numpy")["point_cloud"]))
    torch.testing.assert_close(batch["point_features"], encoder(clouds).reshape(18, 16))
    question = processor.tokenizer("Summarize this object.", add_special_tokens=False)["input_ids"]
    row = batch["input_ids"][0].tolist()
    assert any(row[i:i + len(question)] == question for i in range(len(row)))
    caption = processor.tokenizer("A model of object 1.", add_special_tokens=False)["input_ids"]
    assert [t for t in batch["labels"][1].tolist() if t != -100][:len(caption)] == caption

    config = tiny_model_config(processor)
    config.point_feature_dim = 16
    model = CGMLLMForConditionalGeneration(config)
    labels = batch.pop("labels")
    logits = model(**batch).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    loss.backward()
    assert torch.isfinite(loss) and model.model.obj_und_connector.fc1.weight.grad.abs().sum() > 0


def test_a_batch_cannot_mix_clouds_and_shapes(tmp_path, processor):
    write_pointllm_folder(tmp_path / "p", ["a"], num_points=64)
    cloud = load_caption_dataset(tmp_path / "p")[0]
    shape = {"uid": "s", "caption": "a box", "latents": np.zeros((4, 8), np.float32)}
    collator = CGMLLMDataCollator(processor, 4, task_weights={"shape_caption": 1.0},
                                  point_encoder=_tiny_point_encoder())
    with pytest.raises(ValueError, match="mixes PointBERT clouds \\('a'\\) with ShapeVAE shapes"):
        collator([shape, cloud])


def test_a_rewritten_shape_file_is_read_again_not_served_from_the_cache(tmp_path):
    # Rows are cached by `datasets`; the shape files' sizes and times are part of the cache key.
    (tmp_path / "shapes").mkdir()
    np.save(tmp_path / "shapes" / "u0.npy", np.zeros((5, 6), np.float32))
    (tmp_path / "captions.csv").write_text("u0,a cloud\n")
    assert load_caption_dataset(tmp_path).with_format("numpy")[0]["points"].sum() == 0
    np.save(tmp_path / "shapes" / "u0.npy", np.ones((7, 6), np.float32))
    assert load_caption_dataset(tmp_path).with_format("numpy")[0]["points"].shape == (7, 6)

    clouds = write_pointllm_folder(tmp_path / "p", ["a"], num_points=16)
    first = load_caption_dataset(tmp_path / "p").with_format("numpy")[0]["point_cloud"]
    np.save(tmp_path / "p" / "8192_npy" / "a_8192.npy", clouds["a"][::-1].copy())
    again = load_caption_dataset(tmp_path / "p").with_format("numpy")[0]["point_cloud"]
    np.testing.assert_allclose(again, first[::-1], atol=1e-6)


def test_pointllm_set_through_cgmllm_preprocess_and_cgmllm_train(tmp_path):
    import torch

    from cgmllm.training.cli import train_main

    write_pointllm_folder(tmp_path / "pointllm", ["a", "b", "c"], num_points=64)
    with pytest.raises(ValueError, match="drop --shape-vae"):
        preprocess_main(["--data", str(tmp_path / "pointllm"), "--shape-vae", "x", "--out", str(tmp_path / "c0")])
    cache = preprocess_main(["--data", str(tmp_path / "pointllm"), "--out", str(tmp_path / "cache")])
    assert cache.column_names == ["uid", "caption", "question", "point_cloud"] and len(cache) == 3
    _tiny_point_encoder().save_pretrained(tmp_path / "point_encoder")

    config = Path(__file__).resolve().parents[1] / "training" / "configs" / "example.yaml"
    common = ["--config", str(config), "--set", f"data.path={tmp_path / 'cache'}",
              "--set", "tasks={shape_caption: 1.0}", "--set", "model.tiny.point_feature_dim=16"]
    with pytest.raises(ValueError, match="set `point_encoder`"):
        train_main(common + ["--set", f"output_dir={tmp_path / 'run0'}"])
    model, results = train_main(common + ["--set", f"output_dir={tmp_path / 'run'}",
                                          "--set", f"point_encoder={tmp_path / 'point_encoder'}"])
    assert all(np.isfinite(r["train_loss"]) and r["train_loss"] > 0 for r in results)
    from cgmllm import CGMLLMForConditionalGeneration

    final = CGMLLMForConditionalGeneration.from_pretrained(results[-1]["final"])
    fresh = [(torch.manual_seed(0), type(final)(final.config))[1].model.obj_und_connector.fc1.weight for _ in "ab"]
    assert torch.equal(*fresh)  # the tiny model's initial weights (built as `model.tiny` builds it) ...
    assert not torch.allclose(final.model.obj_und_connector.fc1.weight, fresh[0])  # ... moved: the connector trained
