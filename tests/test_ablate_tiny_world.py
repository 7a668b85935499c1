"""`benchmarks/ablate_tiny_world.py`: each arm's config builds the model it names, the table reports mean and spread
over seeds and names what is missing, and a rerun trains only the arm x seed pairs without a result file."""

import importlib.util
import json
from pathlib import Path

import pytest


BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "ablate_tiny_world.py"


@pytest.fixture(scope="module")
def ablate():
    spec = importlib.util.spec_from_file_location("ablate_tiny_world", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_arm_config_builds_the_model_it_names(ablate, tmp_path):
    from cgmllm.training.cli import load_config
    from cgmllm.training.testing import tiny_model_config, tiny_processor

    processor = tiny_processor()
    expected = {"mot": (16, None, True), "shared": (16, None, False), "tokens32": (32, None, True),
                "tokens64": (64, None, True), "token_by_token": (16, 1, True), "caption_only": (16, None, True)}
    assert set(expected) == set(ablate.ARMS)
    for arm, (tokens, block, mot) in expected.items():
        config = load_config(ablate.arm_config(arm, seed=3, steps=40, work=tmp_path))
        assert config["seed"] == 3 and config["output_dir"] == str(tmp_path / "arms" / f"{arm}-seed3" / "train")
        [stage] = config["stages"]
        # The same budget for every arm; only the named setting differs.
        assert (stage.max_steps, stage.num_shape_tokens, stage.learning_rate) == (40, tokens, 1e-3)
        assert config["training"]["save_steps"] == 10 and config["training"]["use_cpu"] is True
        tiny = dict(config["model"]["tiny"])
        tiny.pop("vocab_size")
        model_config = tiny_model_config(processor, **tiny)
        assert (model_config.num_shape_tokens, model_config.shape_block_size,
                model_config.mixture_of_transformers) == (tokens, block, mot)
        generation = {"text_to_shape", "image_to_shape"} & {k for k, v in config["tasks"].items() if v}
        assert bool(generation) == (arm != "caption_only")
        assert config["tasks"]["shape_caption"] == 1.0
    # The arms start from the shipped config as it was when the work folder was made (a later sitting too).
    assert (tmp_path / "base_config.yaml").read_text() == ablate.BASE_CONFIG.read_text()


def _write_result(work: Path, arm: str, seed: int, **values):
    (work / "results").mkdir(parents=True, exist_ok=True)
    (work / "results" / f"{arm}-seed{seed}.json").write_text(json.dumps({"arm": arm, "seed": seed, **values}))


def test_the_table_gives_mean_and_spread_and_names_what_is_missing(ablate, tmp_path):
    _write_result(tmp_path, "mot", 0, text_to_shape=0.5, p_fid=10.0, mesh_caption=0.8, train_seconds=100)
    _write_result(tmp_path, "mot", 1, text_to_shape=0.7, p_fid=14.0, mesh_caption=0.8, train_seconds=120)
    _write_result(tmp_path, "caption_only", 0, mesh_caption=0.9, train_seconds=50)
    text = ablate.table(tmp_path, ["mot", "caption_only", "shared"], [0, 1])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("|")}
    mot = rows[ablate.ARM_LABELS["mot"]]
    assert mot[1] == "0, 1" and mot[2] == "60% ± 10" and mot[5] == "12.0 ± 2.0" and mot[7] == "80% ± 0"
    caption = rows[ablate.ARM_LABELS["caption_only"]]
    assert caption[1] == "0" and caption[2] == "-" and caption[7] == "90%"
    assert rows[ablate.ARM_LABELS["shared"]][1] == "not run"
    # In the order the job runs them (seed-major).
    assert "Not finished: shared-seed0, caption_only-seed1, shared-seed1." in text


def test_a_rerun_trains_only_what_has_no_result(ablate, tmp_path, monkeypatch):
    for arm in ablate.ARMS:
        if arm != "shared":
            _write_result(tmp_path, arm, 0, text_to_shape=0.5)
    (tmp_path / "results" / "floor.json").write_text(json.dumps({"p_fid": 4.25, "num_rows": 0}))
    trained = _no_training(ablate, monkeypatch)
    assert ablate.main(["--work", str(tmp_path), "--seeds", "0", "--steps", "12"]) == 0
    assert trained == [("shared", 0, 12, "cpu")]
    result = json.loads((tmp_path / "results" / "shared-seed0.json").read_text())
    assert (result["mesh_caption"], result["train_seconds"], result["parameters"]) == (1.0, 7.0, 9)
    # Everything has a result now: a third run trains nothing.
    assert ablate.main(["--work", str(tmp_path), "--seeds", "0", "--steps", "12"]) == 0
    assert len(trained) == 1
    # Results of other settings are not mixed into one table.
    with pytest.raises(ValueError, match=r"other settings \(steps 12 instead of 40\)"):
        ablate.main(["--work", str(tmp_path), "--seeds", "0", "--steps", "40"])
    assert "p-FID floor (the prompts' combinations drawn again with new dimensions, scored the same way): 4.2" in (
        ablate.table(tmp_path, list(ablate.ARMS), [0]))


def test_device_reaches_the_training_config_and_a_missing_gpu_is_refused_before_any_work(ablate, tmp_path):
    import torch

    config = ablate.arm_config("mot", seed=0, steps=8, work=tmp_path, device="cuda")
    assert ablate.yaml.safe_load(config.read_text())["training"]["use_cpu"] is False
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal below is for machines without one")
    work = tmp_path / "work"
    with pytest.raises(SystemExit):
        ablate.main(["--work", str(work), "--device", "cuda"])
    assert not work.exists()  # nothing was built


def test_results_of_another_device_are_not_mixed(ablate, tmp_path, monkeypatch):
    _write_result(tmp_path, "mot", 0, steps=500, num_rows=0, denoise_steps=25, device="cuda")
    (tmp_path / "results" / "floor.json").write_text(json.dumps({"p_fid": 1.0, "num_rows": 0}))
    trained = _no_training(ablate, monkeypatch)
    with pytest.raises(ValueError, match=r"other settings \(device cuda instead of cpu\)"):
        ablate.main(["--work", str(tmp_path), "--seeds", "0", "--arms", "mot"])
    assert trained == []


def _no_training(ablate, monkeypatch):
    """The job with data building, training and evaluation replaced (they are tested elsewhere); returns the list of
    the `(arm, seed, steps, device)` it trained."""
    import torch

    import cgmllm.training.tiny_world.evaluation as evaluation

    trained = []

    def train_arm(arm, seed, steps, work, device):
        ablate.arm_config(arm, seed, steps, work, device)  # what the real one does first
        trained.append((arm, seed, steps, device))
        return torch.nn.Linear(2, 3), None, 7.0

    monkeypatch.setattr(ablate, "prepare_data", lambda work: None)
    monkeypatch.setattr(ablate, "train_arm", train_arm)
    monkeypatch.setattr(ablate, "evaluate_arm",
                        lambda arm, model, processor, rows, steps, pointnet, device: {"mesh_caption": 1.0})
    monkeypatch.setattr(evaluation, "heldout_rows", lambda: [])
    return trained


def test_every_result_and_the_floor_are_checked_before_any_training(ablate, tmp_path, monkeypatch):
    trained = _no_training(ablate, monkeypatch)
    # A result of an arm this run does not train, measured with other steps.
    _write_result(tmp_path, "tokens64", 1, steps=40, num_rows=0, denoise_steps=25, device="cpu")
    with pytest.raises(ValueError, match=r"tokens64-seed1.json was measured with other settings \(steps 40 instead of "
                                         r"12\)"):
        ablate.main(["--work", str(tmp_path), "--seeds", "0", "--arms", "mot", "--steps", "12"])
    assert trained == []
    (tmp_path / "results" / "tokens64-seed1.json").unlink()
    (tmp_path / "results" / "floor.json").write_text(json.dumps({"p_fid": 1.0, "num_rows": 30}))
    with pytest.raises(ValueError, match=r"floor.json was measured on 30 rows instead of 0"):
        ablate.main(["--work", str(tmp_path), "--seeds", "0", "--arms", "mot", "--steps", "12"])
    assert trained == []


def test_an_arm_folder_trained_with_other_steps_or_device_is_refused_before_its_config_is_rewritten(
        ablate, tmp_path, monkeypatch):
    config = ablate.arm_config("mot", seed=0, steps=8, work=tmp_path)
    written = config.read_text()
    with pytest.raises(ValueError, match=r"mot-seed0 was trained with other settings \(steps 8 instead of 12\)"):
        ablate.arm_config("mot", seed=0, steps=12, work=tmp_path)
    with pytest.raises(ValueError, match=r"\(device cpu instead of cuda\)"):
        ablate.arm_config("mot", seed=0, steps=8, work=tmp_path, device="cuda")
    assert config.read_text() == written
    assert ablate.arm_config("mot", seed=0, steps=8, work=tmp_path) == config  # the same settings resume
    # Training without its config: settings unknown.
    (tmp_path / "arms" / "shared-seed0" / "train" / "train" / "final").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds training but .*config.yaml is missing"):
        ablate.arm_config("shared", seed=0, steps=8, work=tmp_path)
    # The job refuses before training anything, even an arm that comes earlier.
    trained = _no_training(ablate, monkeypatch)
    with pytest.raises(ValueError, match=r"\(steps 8 instead of 12\)"):
        ablate.main(["--work", str(tmp_path), "--seeds", "0", "--arms", "tokens32", "mot", "--steps", "12"])
    assert trained == [] and config.read_text() == written


def test_fewer_than_two_rows_are_refused(ablate, tmp_path):
    with pytest.raises(SystemExit):
        ablate.main(["--work", str(tmp_path), "--num", "1"])
    assert not (tmp_path / "results").exists()


def test_a_cut_sitting_still_counts_its_training_seconds(ablate, tmp_path, monkeypatch):
    import time

    import cgmllm.training.cli as cli

    def cut(config, resume=None):
        time.sleep(0.01)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_stages", cut)
    timing = tmp_path / "arms" / "mot-seed0" / "train_seconds.json"
    with pytest.raises(KeyboardInterrupt):
        ablate.train_arm("mot", 0, 8, tmp_path)
    first = json.loads(timing.read_text())
    assert first["seconds"] >= 0.01 and first["train_loss"] is None
    with pytest.raises(KeyboardInterrupt):
        ablate.train_arm("mot", 0, 8, tmp_path)
    assert json.loads(timing.read_text())["seconds"] >= first["seconds"] + 0.01  # sittings add up
