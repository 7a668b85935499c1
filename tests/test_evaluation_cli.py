"""`cgmllm-eval generation` / `captions`: tables, JSON files and the errors for bad inputs."""

import json

import numpy as np
import pytest
import torch
import trimesh

from cgmllm.evaluation.cli import main
from test_evaluation_point_clouds import point_e_state_dict


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "pointnet.pt"
    torch.save({"model_state_dict": point_e_state_dict(num_class=10, width_mult=1)}, path)
    return path


def write_meshes(folder, shapes):
    folder.mkdir(parents=True, exist_ok=True)
    for name, mesh in shapes.items():
        mesh.export(folder / f"{name}.obj")
    return folder


@pytest.fixture(scope="module")
def shape_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    pred = write_meshes(root / "pred", {"a": trimesh.creation.box(), "b": trimesh.creation.icosphere(1),
                                        "c": trimesh.creation.cylinder(0.5, 1.5), "d": trimesh.creation.cone(0.5, 1)})
    ref = write_meshes(root / "ref", {"a": trimesh.creation.box((1, 2, 1)), "b": trimesh.creation.icosphere(2),
                                      "c": trimesh.creation.capsule(1.0, 0.4)})
    # A point cloud stands in for the fourth reference shape.
    np.save(ref / "d.npy", np.asarray(trimesh.sample.sample_surface(trimesh.creation.cone(0.5, 1), 2000, seed=0)[0]))
    return pred, ref


def test_generation_table_and_json(shape_folders, checkpoint, tmp_path, capsys):
    pred, ref = shape_folders
    output = tmp_path / "gen.json"
    code = main(["generation", "--pred", str(pred), "--ref", str(ref), "--pointnet", str(checkpoint),
                 "--num-points", "512", "--kid-subsets", "3", "--kid-subset-size", "4", "-o", str(output)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| p-FID (4 vs 4 shapes) |" in printed and "| p-KID |" in printed
    results = json.loads(output.read_text())
    assert results["num_pred"] == results["num_ref"] == 4
    assert np.isfinite(results["p_fid"]) and results["p_fid"] > 0 and np.isfinite(results["p_kid"])
    assert results["settings"]["num_points"] == 512
    # Same folders, same numbers (fixed sampling seed, deterministic FPS).
    main(["generation", "--pred", str(pred), "--ref", str(ref), "--pointnet", str(checkpoint), "--num-points", "512",
          "--kid-subsets", "3", "--kid-subset-size", "4", "-o", str(tmp_path / "again.json")])
    assert json.loads((tmp_path / "again.json").read_text())["p_fid"] == results["p_fid"]


def test_generation_errors(shape_folders, checkpoint, tmp_path, capsys):
    pred, ref = shape_folders
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    cases = [
        (["--pred", str(tmp_path / "empty"), "--ref", str(ref)], "no meshes"),
        (["--pred", str(tmp_path / "missing"), "--ref", str(ref)], "no such folder"),
        (["--pred", str(pred), "--ref", str(ref), "--kid-subset-size", "10"], "Pass --kid-subset-size 4 or less"),
        (["--pred", str(pred), "--ref", str(ref), "--kid-subset-size", "4", "--pointnet", str(tmp_path / "bad.pt")],
         "torch.load failed"),
        (["--pred", str(pred), "--ref", str(ref), "--num-points", "100"], "at least 512 points"),
        (["--pred", str(pred), "--ref", str(ref), "-o", str(tmp_path / "nowhere" / "x.json")], "does not exist"),
    ]
    for arguments, message in cases:
        if "--pointnet" not in arguments:
            arguments = arguments + ["--pointnet", str(checkpoint)]
        assert main(["generation", *arguments]) == 2
        assert message in capsys.readouterr().err


def tiny_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    vocab.update({f"{word}</w>": 3 + i for i, word in enumerate("a red box ball cone".split())})
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_generation_clip_scores_with_a_tiny_clip(checkpoint, tmp_path, capsys):
    shapes = {"a": trimesh.creation.box(), "b": trimesh.creation.icosphere(1)}
    pred, ref = write_meshes(tmp_path / "pred", shapes), write_meshes(tmp_path / "ref", shapes)
    (tmp_path / "prompts.jsonl").write_text('{"id": "a", "prompt": "a red box"}\n{"id": "b", "prompt": "a ball"}\n')
    clip = tiny_clip(tmp_path / "clip")
    output = tmp_path / "gen.json"
    code = main(["generation", "--pred", str(pred), "--ref", str(ref), "--pointnet", str(checkpoint),
                 "--num-points", "512", "--kid-subsets", "1", "--kid-subset-size", "2", "--clip", str(clip),
                 "--prompts", str(tmp_path / "prompts.jsonl"), "--image-size", "48", "-o", str(output)])
    assert code == 0, capsys.readouterr().err
    results = json.loads(output.read_text())
    assert results["clip_image"] == pytest.approx(100.0, abs=1e-3)  # identical meshes render identical views
    assert 0.0 <= results["clip_text"] <= 100.0
    assert "CLIP image-image" in capsys.readouterr().out
    # A prediction without a reference of the same stem cannot be compared.
    write_meshes(tmp_path / "pred", {"z": trimesh.creation.box()})
    assert main(["generation", "--pred", str(pred), "--ref", str(ref), "--pointnet", str(checkpoint),
                 "--num-points", "512", "--kid-subset-size", "2", "--clip", str(clip), "-o", str(output)]) == 2
    assert "no reference for ['z.obj']" in capsys.readouterr().err


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_captions_table_and_json(tmp_path, capsys):
    pred = write_jsonl(tmp_path / "pred.jsonl", [{"object_id": "x", "model_output": "a small wooden chair"},
                                                 {"object_id": "y", "model_output": ""}])
    ref = write_jsonl(tmp_path / "ref.jsonl", [{"id": "y", "captions": ["a red car", "a car"]},
                                               {"id": "x", "ground_truth": "a wooden chair"}])
    output = tmp_path / "captions.json"
    assert main(["captions", "--pred", str(pred), "--ref", str(ref), "-o", str(output)]) == 0
    assert "| BLEU-1 | 37.50 |" in capsys.readouterr().out  # (75 + 0) / 2
    results = json.loads(output.read_text())
    assert results["count"] == 2 and results["scores"]["rouge_l"] == pytest.approx(100 * 3 / 7, abs=1e-4)
    assert [sample["id"] for sample in results["per_sample"]] == ["x", "y"]


def test_caption_errors(tmp_path, capsys):
    pred = write_jsonl(tmp_path / "pred.jsonl", [{"id": "x", "caption": "a chair"}])
    ref = write_jsonl(tmp_path / "ref.jsonl", [{"id": "x", "caption": "a chair"}, {"id": "z", "caption": "a car"}])
    assert main(["captions", "--pred", str(pred), "--ref", str(ref)]) == 2
    assert "1 reference id(s) without a prediction ['z']" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n")
    assert main(["captions", "--pred", str(tmp_path / "empty.jsonl"), "--ref", str(ref)]) == 2
    assert "no records" in capsys.readouterr().err
    (tmp_path / "broken.jsonl").write_text('{"id": "x", "caption": "a chair"}\n{"id": "y"\n')
    assert main(["captions", "--pred", str(tmp_path / "broken.jsonl"), "--ref", str(ref)]) == 2
    assert "broken.jsonl:2: not JSON" in capsys.readouterr().err
    (tmp_path / "nokey.jsonl").write_text('{"name": "x", "caption": "a chair"}\n')
    assert main(["captions", "--pred", str(tmp_path / "nokey.jsonl"), "--ref", str(ref)]) == 2
    assert "needs an 'id'" in capsys.readouterr().err
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": "x", "caption": "a"}, {"id": "x", "caption": "b"}])
    assert main(["captions", "--pred", str(dup), "--ref", str(ref)]) == 2
    assert "appears twice" in capsys.readouterr().err
