"""Tests of the procedural tiny world (`cgmllm.training.tiny_world`)."""

import json

import numpy as np
import pytest
import trimesh

from cgmllm.training.tiny_world import (
    COMPOSITION,
    FAMILIES,
    FAMILY_NAMES,
    MESH_EXTENT,
    ShapeSpec,
    build_tiny_world_dataset,
    classify_family,
    classify_orientation,
    classify_proportion,
    list_combinations,
    load_tiny_world,
    main,
    make_tiny_world_specs,
    reference_meshes_for,
    split_combinations,
)


COMBINATIONS = list_combinations()


def caption_nouns(spec: ShapeSpec) -> list[set[str]]:
    """The noun sets a caption of `spec` must draw from: one per family (two for compositions)."""
    families = [part.family for part in spec.parts] if spec.family == COMPOSITION else [spec.family]
    return [FAMILIES[family].all_nouns() for family in families]


def test_the_world_has_enough_families_and_combinations():
    assert len(FAMILIES) >= 8
    assert {spec.family for spec in COMBINATIONS} == set(FAMILY_NAMES)
    keys = [spec.combination for spec in COMBINATIONS]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("spec", COMBINATIONS, ids=lambda spec: spec.combination)
def test_every_combination_is_watertight_with_the_attributes_it_claims(spec):
    rng = np.random.default_rng(0)
    for sample in (spec, spec.sample(rng), spec.sample(rng)):  # canonical shape and two jittered ones
        mesh = sample.to_mesh()
        assert mesh.is_watertight and mesh.is_volume
        assert mesh.extents.max() == pytest.approx(MESH_EXTENT)
        np.testing.assert_allclose(mesh.bounds.mean(axis=0), 0.0, atol=1e-9)
        if spec.family == COMPOSITION:
            assert len(mesh.split(only_watertight=False)) == 2
            continue
        if "proportion" in spec.attributes:
            assert classify_proportion(mesh) == spec.attributes["proportion"]
        orientation = spec.attributes.get("orientation")
        if orientation is not None:
            predicted = classify_orientation(mesh)
            # Shapes about as tall as they are wide and without a taper have no discernible axis.
            assert predicted == orientation or (predicted is None and spec.attributes.get("proportion") == "regular")


def test_proportion_thresholds_on_explicit_ratios():
    tall = ShapeSpec("cylinder", {"proportion": "tall", "orientation": "lying"}, dims={"ratio": 2.0, "heading": 0.0})
    flat = ShapeSpec("box", {"proportion": "flat", "orientation": "upright"}, dims={"ratio": 0.45, "yaw": 45.0})
    assert classify_proportion(tall.to_mesh()) == "tall"
    assert classify_orientation(tall.to_mesh()) == "lying"
    bbox = tall.to_mesh().extents  # lying along X: long horizontally
    assert bbox[0] / bbox[1] > 1.9
    assert classify_proportion(flat.to_mesh()) == "flat"
    assert flat.to_mesh().extents[1] / flat.to_mesh().extents.max() < 0.5
    assert classify_orientation(trimesh.creation.icosphere()) is None
    assert classify_proportion(trimesh.creation.icosphere()) == "regular"
    with pytest.raises(ValueError, match="empty"):
        classify_proportion(trimesh.Trimesh())


def test_upside_down_cone_is_recognised():
    for proportion in ("regular", "tall", "flat"):
        up = ShapeSpec("cone", {"proportion": proportion, "orientation": "upright"}).to_mesh()
        down = ShapeSpec("cone", {"proportion": proportion, "orientation": "upside_down"}).to_mesh()
        assert classify_orientation(up) == "upright"
        assert classify_orientation(down) == "upside_down"


@pytest.mark.parametrize("spec", COMBINATIONS[::5], ids=lambda spec: spec.combination)
def test_captions_name_the_shape_and_paraphrases_differ(spec):
    captions = spec.captions()
    assert captions[0] == spec.caption()
    assert len(captions) >= 5 and len(set(captions)) == len(captions)
    for caption in captions:
        for nouns in caption_nouns(spec):
            assert any(noun in caption for noun in nouns), (caption, nouns)
    assert spec.family in spec.caption() or spec.family in ("box", COMPOSITION)
    sampled = spec.captions(num=4, rng=np.random.default_rng(0))
    assert len(sampled) == 4 and sampled[0] == spec.caption() and set(sampled) <= set(captions)
    assert spec.caption(np.random.default_rng(1)) in captions


def test_canonical_captions_mention_the_attributes():
    assert ShapeSpec("cylinder", {"proportion": "tall", "orientation": "upright"}).caption() == "a tall cylinder"
    cone = ShapeSpec("cone", {"proportion": "flat", "orientation": "upside_down"})
    assert cone.caption() == "a flat cone upside down"
    lying = ShapeSpec("capsule", {"orientation": "lying"}).caption()
    assert lying == "a capsule lying on its side"
    stack = ShapeSpec(
        COMPOSITION,
        {"relation": "on_top_of"},
        (ShapeSpec("sphere"), ShapeSpec("box", {"proportion": "regular", "orientation": "upright"})),
    )
    assert stack.caption() == "a sphere on top of a cube"


def test_spec_round_trips_through_json():
    spec = COMBINATIONS[-1].sample(np.random.default_rng(3))
    restored = ShapeSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert restored == spec
    np.testing.assert_allclose(restored.to_mesh().vertices, spec.to_mesh().vertices)


def test_invalid_specs_raise_value_errors():
    with pytest.raises(ValueError, match="Unknown shape family"):
        ShapeSpec("teapot")
    with pytest.raises(ValueError, match="Invalid attributes"):
        ShapeSpec("torus", {"thickness": "thin", "orientation": "upside_down"})
    with pytest.raises(ValueError, match="two different parts"):
        ShapeSpec(COMPOSITION, {"relation": "on_top_of"}, (ShapeSpec("sphere"), ShapeSpec("sphere")))
    lying_cylinder = ShapeSpec("cylinder", {"proportion": "tall", "orientation": "lying"})
    with pytest.raises(ValueError, match="plain shapes"):
        ShapeSpec(COMPOSITION, {"relation": "on_top_of"}, (ShapeSpec("sphere"), lying_cylinder))
    with pytest.raises(ValueError, match="Unknown dims"):
        ShapeSpec("sphere", dims={"ratio": 2.0})


def test_split_is_deterministic_and_novel_combinations_never_reach_train():
    first, second = make_tiny_world_specs(300, 60, seed=0), make_tiny_world_specs(300, 60, seed=0)
    assert [spec.to_dict() for spec in first["train"]] == [spec.to_dict() for spec in second["train"]]
    assert [spec.to_dict() for spec in first["test"]] == [spec.to_dict() for spec in second["test"]]

    split = split_combinations(seed=0)
    novel = {spec.combination for spec in split.novel}
    train = {spec.combination for spec in split.train}
    assert novel and not novel & train
    assert train | novel == {spec.combination for spec in COMBINATIONS}
    assert not novel & {spec.combination for spec in first["train"]}
    test_keys = [spec.combination for spec in first["test"]]
    assert sum(key in novel for key in test_keys) == 30  # half novel, half fresh samples of seen combinations
    assert set(test_keys) - novel <= train

    # Held-out pairs are compositional: the family and the attribute value both still occur in training.
    for family, name, value in split.novel_pairs:
        assert not any(s.family == family and s.attributes.get(name) == value for s in split.train)
        assert any(s.family == family for s in split.train)
        assert len({s.family for s in split.train if s.attributes.get(name) == value}) >= 2
    assert any(spec.family == COMPOSITION for spec in split.novel)


def test_reference_meshes_match_the_requested_attributes():
    meshes = reference_meshes_for("cone", {"proportion": "flat", "orientation": "upright"}, num_variants=3)
    assert len(meshes) == 3
    assert all(classify_proportion(mesh) == "flat" and classify_orientation(mesh) == "upright" for mesh in meshes)
    # Missing attributes default to regular / upright; None values (dataset columns) are ignored.
    (sphere,) = reference_meshes_for("sphere", {"proportion": None}, num_variants=1)
    assert sphere.is_watertight
    (cube,) = reference_meshes_for("box", num_variants=1)
    np.testing.assert_allclose(cube.extents, MESH_EXTENT)
    stack = reference_meshes_for(COMPOSITION, {"relation": "on_top_of"}, parts=["cone", "cylinder"], num_variants=2)
    assert len(stack) == 2 and all(len(mesh.split(only_watertight=False)) == 2 for mesh in stack)
    with pytest.raises(ValueError):
        reference_meshes_for("torus", {"proportion": "tall"})


def test_build_and_load_dataset(tmp_path):
    import datasets

    output_dir = build_tiny_world_dataset(
        tmp_path / "tiny_world", num_train=24, num_heldout=8, image_size=32, seed=0, num_workers=1
    )
    assert (output_dir / "README.md").is_file()
    assert len(list((output_dir / "train" / "meshes").glob("*.ply"))) == 24

    loaded = datasets.load_dataset("meshfolder", data_dir=str(output_dir), cache_dir=str(tmp_path / "cache"))
    assert set(loaded) == {"train", "test"}
    assert loaded["train"].num_rows == 24 and loaded["test"].num_rows == 8
    expected_columns = {
        "mesh", "image", "caption", "captions", "family", "proportion", "thickness", "orientation",
        "relation", "parts", "combination", "novel_combination", "split", "spec",
    }  # fmt: skip
    assert set(loaded["train"].column_names) == expected_columns

    row = loaded["train"][0]
    assert isinstance(row["mesh"], trimesh.Trimesh) and row["mesh"].is_watertight
    assert row["image"].size == (32, 32)
    assert row["captions"][0] == row["caption"] and len(row["captions"]) == len(set(row["captions"]))
    spec = ShapeSpec.from_dict(json.loads(row["spec"]))
    assert spec.combination == row["combination"] and spec.family == row["family"]
    np.testing.assert_allclose(row["mesh"].bounds, spec.to_mesh().bounds, atol=1e-5)

    train = loaded["train"]
    assert set(train["split"]) == {"train"} and not any(train["novel_combination"])
    test = load_tiny_world(output_dir, "test", cache_dir=str(tmp_path / "cache"))
    assert set(test["split"]) == {"test"} and sum(test["novel_combination"]) == 4
    assert not set(test.filter(lambda r: r["novel_combination"])["combination"]) & set(train["combination"])

    # The training stack's loader reads the same folder (one split, paraphrases kept).
    from cgmllm.training.data import load_caption_dataset

    captions = load_caption_dataset(output_dir, split="test")
    assert captions.num_rows == 8 and set(captions.column_names) == {"uid", "caption", "mesh", "captions", "image"}
    assert captions["caption"] == test["caption"] and captions["captions"] == test["captions"]
    assert captions[0]["image"].size == (32, 32)
    np.testing.assert_array_equal(np.asarray(captions[3]["image"]), np.asarray(test[3]["image"]))
    assert "image" not in load_caption_dataset(output_dir, split="test", image_column=None).column_names

    # The files are ordinary meshes too.
    assert trimesh.load(output_dir / "train" / "meshes" / "00000.ply").is_watertight
    with pytest.raises(ValueError, match="Unknown split"):
        load_tiny_world(output_dir, "validation")


def test_command_line_builds_without_images(tmp_path):
    main(["--out", str(tmp_path / "cli"), "--num-train", "4", "--num-heldout", "2", "--no-images", "--num-workers=1"])
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "cli" / "train" / "metadata.parquet")
    assert table.num_rows == 4 and "image" not in table.column_names
    assert pq.read_table(tmp_path / "cli" / "test" / "metadata.parquet").num_rows == 2


def test_family_classifier_is_right_on_ground_truth_and_ignores_pose():
    """The evaluation's family classifier must be right on ground-truth shapes in every pose and proportion, so that
    its accuracy on generated shapes measures the model (it is wrong on a different family's shape)."""
    rng = np.random.default_rng(3)
    cases = [
        ("box", {"proportion": "flat", "orientation": "tilted"}),
        ("cylinder", {"proportion": "tall", "orientation": "lying"}),
        ("pyramid", {"proportion": "tall", "orientation": "upside_down"}),
        ("cone", {"proportion": "tall", "orientation": "tilted"}),
        ("torus", {"thickness": "thin", "orientation": "tilted"}),
        ("tube", {"proportion": "flat", "thickness": "thick", "orientation": "upright"}),
        ("capsule", {"orientation": "lying"}),
        ("ellipsoid", {"proportion": "flat", "orientation": "upright"}),
    ]
    for family, attributes in cases:
        spec = ShapeSpec(family, attributes).sample(rng)  # jittered dims, heading and lean: not a reference
        assert classify_family(spec.to_mesh(), attributes) == family, (family, attributes)
    # A cylinder is not called a box, and a sphere asked for as a box is the nearest box-like family, not a box.
    cylinder = ShapeSpec("cylinder", {"proportion": "flat", "orientation": "upright"}).sample(rng).to_mesh()
    assert classify_family(cylinder, {"proportion": "flat", "orientation": "upright"}) == "cylinder"
    assert classify_family(cylinder, {"proportion": "flat", "orientation": "upright"}, families=["box", "cone"]) in (
        "box", "cone")
    with pytest.raises(ValueError, match="No family has the attributes"):
        classify_family(cylinder, {"thickness": "thin"}, families=["box"])


def test_family_accuracy_by_prompt_groups_and_sorts_worst_first():
    from cgmllm.training.tiny_world.evaluation import family_accuracy_by_prompt

    predictions = [
        {"caption": "a flat box", "family": "box", "predicted": "cylinder"},
        {"caption": "a cone", "family": "cone", "predicted": "cone"},
        {"caption": "a flat box", "family": "box", "predicted": "box"},
        {"caption": "a flat box", "family": "box", "predicted": "cylinder"},
        {"caption": "a tall pyramid", "family": "pyramid", "predicted": None},  # an empty mesh
        {"caption": "a cone", "family": "cone", "predicted": "pyramid"},
    ]
    groups = family_accuracy_by_prompt(predictions)
    assert [(g["caption"], g["right"], g["total"]) for g in groups] == [
        ("a tall pyramid", 0, 1), ("a flat box", 1, 3), ("a cone", 1, 2)]
    assert dict(groups[0]["instead"]) == {None: 1}
    assert dict(groups[1]["instead"]) == {"cylinder": 2}
    assert family_accuracy_by_prompt([]) == []


def test_text_to_shape_passes_the_sampling_arguments_to_the_pipeline():
    # The benchmark's --guidance-interval / --no-guidance-renorm reach the pipeline: a reversed interval is the
    # pipeline's own error, and a valid one generates.
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from cgmllm.pipelines import CGMLLMPipeline
    from cgmllm.training.testing import tiny_model, tiny_processor, tiny_vae
    from cgmllm.training.tiny_world.evaluation import text_to_shape

    processor = tiny_processor()
    pipe = CGMLLMPipeline(model=tiny_model(processor).eval(), vae=tiny_vae(), processor=processor,
                          scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    rows = [{"caption": "a ball", "family": "sphere", "mesh": trimesh.creation.icosphere()}]
    with pytest.raises(ValueError, match="guidance_interval"):
        text_to_shape(pipe, rows, num_inference_steps=2, guidance_interval=(0.9, 0.1))
    with torch.no_grad():
        result = text_to_shape(pipe, rows, num_inference_steps=2, octree_resolution=16, guidance_interval=None,
                               guidance_renorm=False)
    assert result["count"] == 1 and len(result["predictions"]) == 1
