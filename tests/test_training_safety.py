"""Training that never loses work silently: finite checks, atomic checkpoints, resume (Trainer and `cgmllm-train`),
EMA continuity, strict loading, config checks. Each test reproduces a fault that used to pass without a word."""

import logging
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, TrainingArguments

from cgmllm.training.checks import NonFiniteLossError
from cgmllm.training.cli import load_config, train_main
from cgmllm.training.collator import CGMLLMDataCollator
from cgmllm.training.preprocess import encode_dataset, load_shape_vae
from cgmllm.training.testing import PRIMITIVES, tiny_model, tiny_vae
from cgmllm.training.trainer import EMA_WEIGHTS_NAME, CGMLLMTrainer, EMACallback


EXAMPLE_CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "example.yaml"


def _args(out, **kwargs):
    defaults = dict(per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, remove_unused_columns=False,
                    report_to=[], use_cpu=True, save_strategy="steps", save_steps=2, seed=0,
                    lr_scheduler_type="constant")
    defaults.update(kwargs)
    return TrainingArguments(str(out), **defaults)


def _trainer(out, processor, cache, model=None, **kwargs):
    collator = CGMLLMDataCollator(processor, 8, condition_dropout=0.5)
    ema = {key: kwargs.pop(key) for key in ("ema_decay", "ema_restart_on_missing") if key in kwargs}
    return CGMLLMTrainer(model=model or tiny_model(processor), args=_args(out, **kwargs), train_dataset=cache,
                         data_collator=collator, **{"ema_decay": 0.5, **ema})


def _with_nan_latents(cache, uid, column="latents_8"):
    """`cache` with one NaN in the `column` latents of sample `uid`."""
    columns = cache[:]
    latents = np.asarray(columns[column], dtype=np.float32)
    latents[columns["uid"].index(uid), 1, 2] = np.nan
    columns[column] = latents
    return Dataset.from_dict(columns, features=cache.features)


# 1. Non-finite data and losses ----------------------------------------------------------------------------------------
def test_latent_cache_refuses_non_finite_points_and_latents():
    points = [np.random.default_rng(i).random((64, 6)).astype(np.float32) for i in range(3)]
    points[1][5, 0] = np.nan
    data = Dataset.from_dict({"uid": ["a", "b", "c"], "caption": ["x", "y", "z"], "points": points})
    with pytest.raises(ValueError, match=r"surface points of sample\(s\) \['b'\] are not finite \(\d+ NaN"):
        encode_dataset(data, tiny_vae(), 4)
    vae = tiny_vae()
    with torch.no_grad():
        next(vae.parameters()).fill_(float("nan"))  # finite input, a broken VAE: caught at the latents
    with pytest.raises(ValueError, match=r"ShapeVAE latents \(N=4\) of sample\(s\) \['a'\]"):
        encode_dataset(data.select([0]), vae, 4)


def test_nan_in_a_cached_latent_stops_cgmllm_train_naming_the_sample(tmp_path, processor, cache):
    poisoned = _with_nan_latents(cache, "box")
    collator = CGMLLMDataCollator(processor, 8, task_weights={"text_to_shape": 1.0})
    with pytest.raises(ValueError, match=r"cached latents \('latents_8'\) of sample\(s\) \['box'\] are not finite"):
        collator([poisoned[i] for i in range(len(poisoned))])
    collator([poisoned[i] for i in range(len(poisoned)) if poisoned[i]["uid"] != "box"])  # the others are fine

    # The reproduction: the cache is read by cgmllm-train, which used to exit 0 with NaN weights.
    _with_nan_latents(_with_nan_latents(cache, "box", "latents_4"), "box").save_to_disk(str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"\['box'\] are not finite"):
        train_main(["--config", str(EXAMPLE_CONFIG), "--set", f"data.path={tmp_path / 'cache'}",
                    "--set", f"output_dir={tmp_path / 'run'}", "--set", "shape_vae=null"])


def test_non_finite_loss_stops_training_with_the_step_and_the_sample_ids(tmp_path, processor, cache):
    class BreakAfterFirstStep(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                with torch.no_grad():
                    model.llm2obj.weight.fill_(float("inf"))  # the next flow loss is not finite

    trainer = _trainer(tmp_path, processor, cache, max_steps=3, save_steps=1)
    trainer.data_collator.task_weights = {"text_to_shape": 1.0}
    trainer.add_callback(BreakAfterFirstStep())
    with pytest.raises(NonFiniteLossError, match=r"Training step 2: the loss is (nan|inf)") as error:
        trainer.train()
    uids = re.search(r"batch of samples (\[.*?\])", str(error.value)).group(1)
    assert len(eval(uids)) == 2 and set(eval(uids)) <= set(PRIMITIVES)
    saved = load_file(str(tmp_path / "checkpoint-1" / "model.safetensors"))  # saved before the break: intact
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert not (tmp_path / "checkpoint-2").exists()


# 2. EMA -------------------------------------------------------------------------------------------------------------
def test_resume_without_an_ema_file_is_an_error_or_an_explicit_restart(tmp_path, processor, cache, caplog):
    _trainer(tmp_path, processor, cache, max_steps=2).train()
    os.remove(tmp_path / "checkpoint-2" / EMA_WEIGHTS_NAME)
    missing = str(tmp_path / "checkpoint-2" / EMA_WEIGHTS_NAME)
    with pytest.raises(ValueError, match=re.escape(missing) + ".*lose its history"):
        _trainer(tmp_path, processor, cache, max_steps=4).train(resume_from_checkpoint=True)
    with caplog.at_level(logging.WARNING, logger="cgmllm.training.trainer"):
        _trainer(tmp_path, processor, cache, max_steps=4, ema_restart_on_missing=True).train(
            resume_from_checkpoint=True)
    assert f"{missing} is missing: the EMA restarts" in caplog.text


def test_the_ema_runs_on_across_the_stages_of_a_staged_run(tmp_path, mesh_folder):
    # One step per stage at decay 0.9: stage 2's EMA must be 0.9 * (stage 1's EMA) + 0.1 * (its weights); a restart
    # would give 0.9 * (stage 1's weights) + 0.1 * (its weights).
    train_main(["--config", str(EXAMPLE_CONFIG), "--set", f"data.path={mesh_folder}", "--set", f"output_dir={tmp_path}",
                "--set", "ema_decay=0.9", "--set", "stages.0.max_steps=1", "--set", "stages.1.max_steps=1"])
    ema1, ema2 = (load_file(str(tmp_path / stage / "final" / EMA_WEIGHTS_NAME)) for stage in ("align", "progressive-4"))
    weights1, weights2 = (load_file(str(tmp_path / stage / "final" / "model.safetensors"))
                          for stage in ("align", "progressive-4"))
    moved = [name for name in ema2 if name in weights2 and not torch.equal(weights1[name], weights2[name])]
    assert moved
    for name in moved:
        torch.testing.assert_close(ema2[name], 0.9 * ema1[name] + 0.1 * weights2[name], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(ema1[name], weights1[name]) for name in moved)  # so a restart would differ


# 3./4. Atomic checkpoints, partial ones ----------------------------------------------------------------------------
def test_a_kill_mid_save_leaves_the_previous_checkpoint_usable(tmp_path, processor, cache, monkeypatch, caplog):
    original = EMACallback.save

    def killed_on_the_second_save(self, directory):
        if "checkpoint-4" in directory:
            raise KeyboardInterrupt("killed while saving checkpoint-4")
        return original(self, directory)

    monkeypatch.setattr(EMACallback, "save", killed_on_the_second_save)
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path, processor, cache, max_steps=6).train()
    monkeypatch.setattr(EMACallback, "save", original)
    # The checkpoint being written exists only under its temporary name; checkpoint-2 is complete (EMA included).
    assert sorted(os.listdir(tmp_path)) == [".incomplete-checkpoint-4", "checkpoint-2"]
    assert (tmp_path / "checkpoint-2" / EMA_WEIGHTS_NAME).is_file()
    # A partial `checkpoint-*` as older versions (or a copy) could leave: the Trainer used to fail with a raw
    # FileNotFoundError on trainer_state.json.
    (tmp_path / "checkpoint-5").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "checkpoint-5" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"checkpoint-5: it is not a complete checkpoint .*newest complete one next "
                                         r"to it is .*checkpoint-2"):
        _trainer(tmp_path, processor, cache, max_steps=6).train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    with caplog.at_level(logging.WARNING, logger="cgmllm.training.checkpointing"):
        trainer = _trainer(tmp_path, processor, cache, max_steps=6)
        trainer.train(resume_from_checkpoint=True)
    assert "['.incomplete-checkpoint-4']" in caplog.text and "skipping incomplete checkpoint(s) ['checkpoint-5']" \
        in caplog.text
    assert [e["step"] for e in trainer.state.log_history if "loss" in e][:3] == [1, 2, 3]  # 1-2 from checkpoint-2
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".incomplete")]
    assert (tmp_path / "checkpoint-6" / EMA_WEIGHTS_NAME).is_file()


def test_checkpoint_rotation_still_applies(tmp_path, processor, cache):
    _trainer(tmp_path, processor, cache, max_steps=4, save_steps=1, save_total_limit=2).train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "checkpoint-4", EMA_WEIGHTS_NAME]


# 3. cgmllm-train --resume ---------------------------------------------------------------------------------------------
class Killed(Exception):
    pass


def _kill_at(monkeypatch, stage: str, step: int):
    """Make the trainer of `stage` die before optimizer step `step + 1` (as a kill would, mid-run)."""
    original = CGMLLMTrainer.training_step

    def training_step(self, *args, **kwargs):
        if os.path.basename(self.args.output_dir) == stage and self.state.global_step == step:
            raise Killed(f"{stage} at step {step}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CGMLLMTrainer, "training_step", training_step)


def test_cgmllm_train_resume_equals_the_uninterrupted_run(tmp_path, mesh_folder, monkeypatch, caplog):
    def train(out, *extra):
        return train_main(["--config", str(EXAMPLE_CONFIG), "--set", f"data.path={mesh_folder}",
                          "--set", f"output_dir={out}", "--set", "stages.1.max_steps=4", "--set", "ema_decay=0.9",
                          "--set", "training.save_strategy=steps", "--set", "training.save_steps=2", *extra])

    straight_model, _ = train(tmp_path / "straight")
    out = tmp_path / "killed"
    with monkeypatch.context() as patch:  # killed in stage 2 before its first checkpoint
        _kill_at(patch, "progressive-4", 1)
        with pytest.raises(Killed):
            train(out)
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume"):
        train(out)  # a fresh start would overwrite them
    with monkeypatch.context() as patch:  # resumed: starts stage 2 from stage 1's final weights; killed again
        _kill_at(patch, "progressive-8", 3)
        with pytest.raises(Killed):
            train(out, "--resume")
    assert sorted(os.listdir(out / "progressive-8")) == ["checkpoint-2"]
    with caplog.at_level(logging.WARNING, logger="cgmllm.training.checkpointing"):
        (out / "progressive-8" / "checkpoint-4").mkdir()  # a partial checkpoint, skipped with a warning
        model, results = train(out, "--resume")
    assert "skipping incomplete checkpoint(s) ['checkpoint-4']" in caplog.text
    assert [r["skipped"] for r in results] == [True, True, False]
    assert results[2]["resumed_from"] == str(out / "progressive-8" / "checkpoint-2")
    assert math.isfinite(results[0]["train_loss"])  # read back from align/final/trainer_state.json
    straight = straight_model.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, straight[name], rtol=0, atol=0, msg=name)
    for name, value in load_file(str(out / "progressive-8" / "final" / EMA_WEIGHTS_NAME)).items():
        torch.testing.assert_close(value, load_file(str(tmp_path / "straight" / "progressive-8" / "final" /
                                                        EMA_WEIGHTS_NAME))[name], rtol=0, atol=0)
    shutil.copytree(out / "progressive-8" / "checkpoint-2", tmp_path / "elsewhere" / "checkpoint-2")
    with pytest.raises(ValueError, match=r"'elsewhere' is not a stage of this config"):
        train(out, "--resume", str(tmp_path / "elsewhere" / "checkpoint-2"))
    model, results = train(out, "--resume", str(out / "progressive-8" / "checkpoint-2"))  # an explicit checkpoint
    assert [r["skipped"] for r in results] == [True, True, False]


# 5./6. Strict loading -------------------------------------------------------------------------------------------------
def test_a_shape_vae_folder_with_a_missing_weight_is_an_error(tmp_path):
    tiny_vae().save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    dropped = sorted(weights)[3]
    del weights[dropped]
    save_file(weights, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=re.escape(f"1 missing: ['{dropped}']")):
        load_shape_vae(tmp_path)


def test_a_model_folder_with_a_missing_weight_is_an_error_for_cgmllm_train(tmp_path, mesh_folder, processor):
    tiny_model(processor).save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    common = ["--config", str(EXAMPLE_CONFIG), "--set", f"data.path={mesh_folder}", "--set",
              f"model={{pretrained: {tmp_path / 'model'}}}", "--set", "stages.0.max_steps=1", "--set",
              "stages.1.max_steps=1"]
    train_main([*common, "--set", f"output_dir={tmp_path / 'ok'}"])  # a complete folder loads and trains
    weights = load_file(str(tmp_path / "model" / "model.safetensors"))
    dropped = "model.llm2obj.weight" if "model.llm2obj.weight" in weights else sorted(weights)[0]
    del weights[dropped]
    weights["model.not_a_weight"] = torch.zeros(1)
    save_file(weights, str(tmp_path / "model" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(f"1 missing: ['{dropped}']; 1 unexpected: ['model.not_a_weight']")):
        train_main([*common, "--set", f"output_dir={tmp_path / 'bad'}"])


# 7./Also. Config: relative --set paths, types, resume_from_checkpoint -------------------------------------------------
def test_relative_set_paths_resolve_against_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(EXAMPLE_CONFIG, ["output_dir=runs/x", "model.pretrained=init"])
    assert config["output_dir"] == str(tmp_path / "runs" / "x")
    assert config["model"]["pretrained"] == str(tmp_path / "init")
    assert config["data"]["path"] == str(EXAMPLE_CONFIG.parent / "tiny_meshes")  # written in the file: its folder
    assert config["shape_vae"] == "tiny"
    config = load_config(EXAMPLE_CONFIG, ["data.path=meshes"])
    assert config["data"]["path"] == str(tmp_path / "meshes")


@pytest.mark.parametrize("assignment, message", [
    ("ema_decay=abc", "--set: ema_decay = 'abc' is a str; expected float or null"),
    ("seed=1.5", "--set: seed = 1.5 is a float; expected int"),
    ("stages.0.max_steps=ten", "--set: stages.0.max_steps = 'ten' is a str; expected int or list"),
    ("training.logging_steps=often", "--set: training.logging_steps = 'often' is a str; expected float"),
    ("training.bf16=maybe", "--set: training.bf16 = 'maybe' is a str; expected bool"),
    ("data.skip_bad_samples=3", "--set: data.skip_bad_samples = 3 is a int; expected bool"),
    ("tasks.image_caption=lots", "--set: tasks.image_caption = 'lots' is a str; expected float"),
    ("training.resume_from_checkpoint=runs/x/checkpoint-2", "pass `--resume` or `--resume CHECKPOINT` instead"),
])
def test_set_values_are_type_checked(assignment, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(EXAMPLE_CONFIG, [assignment])


def test_numeric_strings_and_ints_are_accepted_where_floats_are_expected():
    config = load_config(EXAMPLE_CONFIG, ["stages.0.learning_rate=1e-4", "ema_decay=1e-1", "training.logging_steps=2"])
    assert config["stages"][0].learning_rate == pytest.approx(1e-4) and config["ema_decay"] == pytest.approx(0.1)


# 9./Also. Converter rows, remote-code imports -------------------------------------------------------------------------
def test_converter_refuses_an_lm_head_with_another_row_count(processor):
    from cgmllm.training.convert import EMBED_KEY, LM_HEAD_KEY, convert_official_state_dict

    model = tiny_model(processor)
    state = model.state_dict()
    official = {"language_model.model." + key[len("model.language_model."):]: value
                for key, value in state.items() if key == EMBED_KEY}
    official["language_model.lm_head.weight"] = state[LM_HEAD_KEY][:-3]
    ids = processor.special_token_ids
    with pytest.raises(ValueError, match=r"embedding has \d+ rows but its lm_head has \d+"):
        convert_official_state_dict(official, model, ids["obj_start_token_id"], ids["obj_end_token_id"],
                                    ids["obj_pad_token_id"])


def test_remote_code_files_do_not_ask_for_the_cgmllm_package(monkeypatch):
    """Loading a saved folder as remote code used to log "Run `pip install cgmllm`" (diffusers scans the import lines
    of the pipeline file): nothing needs installing there."""
    import sys

    from diffusers.utils import dynamic_modules_utils
    from transformers.dynamic_module_utils import get_imports

    root = Path(__file__).resolve().parents[1]
    warnings = []
    monkeypatch.setattr(dynamic_modules_utils.logger, "warning", warnings.append)
    monkeypatch.setitem(sys.modules, "cgmllm", None)  # as where the package is not installed
    for path in (root / "pipelines" / "pipeline_cgmllm.py", root / "checkpoints" / "tiny-world" / "pipeline_cgmllm.py"):
        dynamic_modules_utils.check_imports(str(path))
    assert not [message for message in warnings if "cgmllm" in message]
    for path in (root / "modeling_cgmllm").glob("*_cgmllm.py"):
        assert "cgmllm" not in get_imports(str(path)), path
