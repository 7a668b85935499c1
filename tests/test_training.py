"""Training stack: data layouts, latent cache, collator/packing, CGMLLMTrainer (loss, EMA, resume), staged CLI."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Mesh, Value, load_from_disk
from transformers import TrainingArguments

from cgmllm.training.collator import CGMLLMDataCollator
from cgmllm.training.data import load_caption_dataset
from cgmllm.training.preprocess import encode_dataset
from cgmllm.training.preprocess import main as preprocess_main
from cgmllm.training.testing import PRIMITIVES, primitive_mesh, tiny_model, tiny_vae, write_mesh_folder
from cgmllm.training.trainer import EMA_WEIGHTS_NAME, CGMLLMTrainer


EXAMPLE_CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "example.yaml"


def _args(out, **kwargs):
    defaults = dict(per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, remove_unused_columns=False,
                    report_to=[], use_cpu=True, save_strategy="no", seed=0, lr_scheduler_type="constant")
    defaults.update(kwargs)
    return TrainingArguments(str(out), **defaults)


# 1. Data layouts ------------------------------------------------------------------------------------------------------
def test_meshfolder_layout(mesh_folder):
    ds = load_caption_dataset(mesh_folder)
    assert ds.column_names == ["uid", "caption", "mesh"]
    assert isinstance(ds.features["mesh"], Mesh)
    assert sorted(ds["uid"]) == sorted(PRIMITIVES)
    assert dict(zip(ds["uid"], ds["caption"]))["box"] == PRIMITIVES["box"]


def test_cap3d_layout_meshes_and_points(tmp_path):
    (tmp_path / "shapes").mkdir()
    primitive_mesh("box").export(tmp_path / "shapes" / "uid0.glb")
    primitive_mesh("ball").export(tmp_path / "shapes" / "uid1.ply")
    (tmp_path / "captions.csv").write_text("uid0,a small box\nuid1,\"a round, smooth ball\"\n")  # no header
    ds = load_caption_dataset(tmp_path, layout="auto")
    assert ds["uid"] == ["uid0", "uid1"] and ds["caption"][1] == "a round, smooth ball"

    points_dir = tmp_path / "pc"
    points_dir.mkdir()
    np.save(points_dir / "p0.npy", np.random.rand(64, 6).astype(np.float32))
    (tmp_path / "pc.csv").write_text("p0,a point cloud\n")
    ds = load_caption_dataset({"captions": tmp_path / "pc.csv", "shapes": points_dir})
    assert ds.column_names == ["uid", "caption", "points"] and np.asarray(ds[0]["points"]).shape == (64, 6)


def test_parquet_layout_with_embedded_meshes(tmp_path):
    features = Features({"uid": Value("string"), "caption": Value("string"), "mesh": Mesh()})
    Dataset.from_dict({"uid": ["a", "b"], "caption": ["a box", "a cone"],
                       "mesh": [primitive_mesh("box"), primitive_mesh("cone")]}, features=features
                      ).to_parquet(str(tmp_path / "train.parquet"))
    ds = load_caption_dataset(tmp_path / "train.parquet")
    assert ds["uid"] == ["a", "b"] and ds[0]["mesh"]["bytes"]


def test_bad_samples_raise_naming_the_sample_or_are_skipped_with_a_warning(tmp_path, caplog):
    folder = Path(write_mesh_folder(tmp_path / "d", names=["box", "ball"]))
    (folder / "broken.glb").write_bytes(b"not a mesh at all")
    with open(folder / "metadata.csv", "a") as handle:
        handle.write("missing.glb,a ghost\nbroken.glb,a broken mesh\n")
    with pytest.raises(ValueError, match="'missing'.*missing"):
        load_caption_dataset(folder)
    with caplog.at_level(logging.WARNING):
        ds = load_caption_dataset(folder, skip_bad_samples=True)
    assert sorted(ds["uid"]) == ["ball", "box"]
    assert "missing" in caplog.text and "broken" in caplog.text

    (tmp_path / "c").mkdir()
    primitive_mesh("box").export(tmp_path / "c" / "u0.glb")
    (tmp_path / "c" / "caps.csv").write_text("u0,   \n")  # Cap3D rows without a caption are dropped with a warning
    with pytest.raises(ValueError, match="No usable samples"):
        load_caption_dataset(tmp_path / "c", layout="cap3d")
    (folder / "metadata.csv").write_text("file_name,caption\nbox.glb,a box\nball.glb,   \n")
    with pytest.raises(ValueError, match="'ball': empty caption"):
        load_caption_dataset(folder)
    with pytest.raises(ValueError, match="Unknown layout"):
        load_caption_dataset(tmp_path, layout="zip")


def test_meshfolder_images_reach_the_latent_cache_and_the_image_tasks(tmp_path, processor):
    # metadata.csv may name a view of each object; it is loaded as an `Image()` column, checked up front, carried
    # through the latent cache and fed to the image tasks (the tiny world embeds its views in metadata.parquet).
    from PIL import Image

    folder = Path(write_mesh_folder(tmp_path / "d", names=["box", "cone"]))
    rng = np.random.default_rng(0)
    for name in ("box", "cone"):
        Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    (folder / "metadata.csv").write_text("file_name,caption,image\nbox.glb,a small box,box.png\n"
                                         "cone.glb,a pointy cone,cone.png\n")
    ds = load_caption_dataset(folder)
    assert ds.column_names == ["uid", "caption", "mesh", "image"] and ds[0]["image"].size == (40, 24)
    assert load_caption_dataset(folder, image_column=None).column_names == ["uid", "caption", "mesh"]

    cache = encode_dataset(ds, tiny_vae(), 4)
    assert cache.column_names == ["uid", "caption", "image", "latents"]
    np.testing.assert_array_equal(np.asarray(cache[1]["image"]), np.asarray(Image.open(folder / "cone.png")))
    batch = CGMLLMDataCollator(processor, 4, task_weights={"image_caption": 1.0}, condition_dropout=0.0)(list(cache))
    assert int((batch["input_ids"] == processor.special_token_ids["image_token_id"]).sum()) > 0

    (folder / "cone.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="'cone': unreadable image"):
        load_caption_dataset(folder)
    (folder / "cone.png").unlink()
    with pytest.raises(ValueError, match="'cone': image file .*cone.png is missing"):
        load_caption_dataset(folder)


# 2. Latent cache ------------------------------------------------------------------------------------------------------
def test_preprocess_cli_writes_a_reproducible_latent_cache(tmp_path, mesh_folder):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    out = preprocess_main(["--data", mesh_folder, "--shape-vae", str(tmp_path / "vae"), "--num-latents", "8",
                           "--out", str(tmp_path / "cache")])
    again = load_from_disk(str(tmp_path / "cache"))
    assert out.column_names == ["uid", "caption", "latents"]
    latents = np.asarray(again[0]["latents"])
    assert latents.shape == (8, 8) and np.isfinite(latents).all()
    direct = encode_dataset(load_caption_dataset(mesh_folder), vae, 8)
    np.testing.assert_allclose(np.asarray(direct[0]["latents"]), latents, rtol=0, atol=1e-6)


def test_console_scripts_exit_with_status_zero(tmp_path, mesh_folder):
    # A console script's return value becomes the process exit status (`sys.exit(main())`): the commands must return
    # 0, not the objects that the Python-callable `main`s return (a dataset would exit 1 and print its repr).
    from importlib.metadata import entry_points

    scripts = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("cgmllm")}
    assert {"cgmllm", "cgmllm-train", "cgmllm-preprocess", "cgmllm-build", "cgmllm-convert-official"} <= set(scripts)
    tiny_vae().save_pretrained(tmp_path / "vae")
    status = scripts["cgmllm-preprocess"].load()(["--data", mesh_folder, "--shape-vae", str(tmp_path / "vae"),
                                                  "--num-latents", "8", "--out", str(tmp_path / "cache")])
    assert status == 0 and load_from_disk(str(tmp_path / "cache")).num_rows > 0
    for name in ("cgmllm-train", "cgmllm-build", "cgmllm-convert-official"):
        assert scripts[name].load().__name__.endswith("_script"), name


# 3. Collator ----------------------------------------------------------------------------------------------------------
def test_collator_tasks_dropout_and_labels(processor, cache):
    examples = [cache[i] for i in range(len(cache))]
    ids = processor.special_token_ids
    collator = CGMLLMDataCollator(processor, 8, task_weights={"shape_caption": 1.0})
    batch = collator(examples)
    assert "packed_sample_ids" not in batch
    assert batch["shape_latents"].shape == (8 * len(examples), 8) and not batch["shape_loss_mask"].any()
    caption_ids = processor.tokenizer(processor.caption_target(examples[0]["caption"]),
                                      add_special_tokens=False)["input_ids"]
    labels = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert labels == caption_ids  # CE only on the caption and its <|im_end|>

    always = CGMLLMDataCollator(processor, 8, task_weights={"text_to_shape": 1.0}, condition_dropout=1.0)
    batch = always(examples)
    assert (batch["labels"] == -100).all() and batch["shape_loss_mask"].all()
    # Dropped condition: the empty context, i.e. the sequence is only the 3D block.
    assert batch["input_ids"][0, 0] == ids["obj_start_token_id"]
    never = CGMLLMDataCollator(processor, 4, task_weights={"text_to_shape": 1.0}, condition_dropout=0.0)
    expected = processor(text=processor.text_to_shape_prompt(examples[0]["caption"]) + "<shape>",
                         num_shape_tokens=4, padding=False)["input_ids"][0]
    assert never([examples[0]])["input_ids"][0].tolist() == expected.tolist()

    mixed = CGMLLMDataCollator(processor, 8, condition_dropout=0.5, seed=3)
    first, second = mixed(examples), mixed(examples)
    assert torch.equal(first["input_ids"], second["input_ids"])  # seeded by (seed, epoch, uid): reproducible
    mixed.set_epoch(1)
    assert not all(torch.equal(a, b) for a, b in zip(first.values(), mixed(examples).values()) if a.shape == b.shape)


def test_collator_packs_rows_and_matches_unpacked_losses(processor, cache):
    examples = [cache[i] for i in range(4)]
    model = tiny_model(processor).eval()
    unpacked = CGMLLMDataCollator(processor, 4, condition_dropout=0.5, seed=1)(examples)
    packed = CGMLLMDataCollator(processor, 4, condition_dropout=0.5, seed=1, max_tokens=64)(examples)
    assert packed["input_ids"].shape[0] < unpacked["input_ids"].shape[0]
    assert packed["packed_sample_ids"].shape == packed["input_ids"].shape
    # The same latent rows in the same (row-major) order of <|obj_pad|>.
    torch.testing.assert_close(packed["shape_latents"], unpacked["shape_latents"])
    pad = processor.special_token_ids["obj_pad_token_id"]
    assert int((packed["input_ids"] == pad).sum()) == packed["shape_latents"].shape[0]
    with torch.no_grad():
        a = model(**unpacked, shape_timesteps=torch.full((unpacked["shape_latents"].shape[0],), 0.5))
        b = model(**packed, shape_timesteps=torch.full((packed["shape_latents"].shape[0],), 0.5))
    torch.testing.assert_close(a.velocity, b.velocity, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="packing budget"):
        CGMLLMDataCollator(processor, 8, max_tokens=8)(examples)
    with pytest.raises(ValueError, match="shape tokens"):
        CGMLLMDataCollator(processor, 16)([{"uid": "x", "caption": "c", "latents": np.zeros((8, 8))}])


def test_collator_encodes_meshes_on_the_fly(processor, mesh_folder):
    raw = load_caption_dataset(mesh_folder)
    collator = CGMLLMDataCollator(processor, 4, vae=tiny_vae(), condition_dropout=0.0)
    batch = collator([raw[0], raw[1]])
    assert batch["shape_latents"].shape == (8, 8) and torch.isfinite(batch["shape_latents"]).all()
    with pytest.raises(ValueError, match="no VAE"):
        CGMLLMDataCollator(processor, 4)([raw[0]])


def test_collator_image_tasks_feed_the_model(processor, cache):
    from PIL import Image

    rng = np.random.default_rng(0)
    examples = [dict(cache[i], image=Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)))
                for i in range(3)]
    collator = CGMLLMDataCollator(processor, 4, task_weights={"image_to_shape": 1.0, "image_caption": 1.0},
                                  condition_dropout=0.0, max_tokens=80)
    batch = collator(examples)
    image_id = processor.special_token_ids["image_token_id"]
    assert int((batch["input_ids"] == image_id).sum()) == int(batch["image_grid_thw"].prod(-1).sum())
    out = tiny_model(processor)(**batch)
    assert torch.isfinite(out.loss)


# 4. Trainer -----------------------------------------------------------------------------------------------------------
def test_trainer_logs_both_losses_saves_ema_and_checkpointing_works(tmp_path, processor, cache):
    model = tiny_model(processor)
    collator = CGMLLMDataCollator(processor, 8, condition_dropout=0.5, max_tokens=64)
    trainer = CGMLLMTrainer(model=model, args=_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=2,
                                                     gradient_checkpointing=True),
                            train_dataset=cache, data_collator=collator, ema_decay=0.9)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all("lm_loss" in e and "flow_loss" in e for e in logs)
    assert all(np.isfinite(e["loss"]) for e in logs)
    assert (tmp_path / "checkpoint-2" / EMA_WEIGHTS_NAME).is_file() and (tmp_path / EMA_WEIGHTS_NAME).is_file()
    from safetensors.torch import load_file

    ema = load_file(str(tmp_path / EMA_WEIGHTS_NAME))
    assert set(ema) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_accumulation_matches_one_big_batch(tmp_path, processor, cache):
    # Captioning only: no noise, so the two runs see identical inputs; CE is normalised by the global token count.
    collator = CGMLLMDataCollator(processor, 8, task_weights={"shape_caption": 1.0})
    params = []
    for batch_size, accumulation in ((4, 1), (1, 4)):
        model = tiny_model(processor)
        trainer = CGMLLMTrainer(model=model, args=_args(tmp_path / f"ga{accumulation}", max_steps=1, optim="sgd",
                                                         per_device_train_batch_size=batch_size,
                                                         gradient_accumulation_steps=accumulation,
                                                         max_grad_norm=0.0, data_seed=0),
                                train_dataset=cache.select(range(4)), data_collator=collator)
        trainer.train()
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(params[0], params[1], rtol=1e-4, atol=1e-6)


# 6. Resume ------------------------------------------------------------------------------------------------------------
def test_resume_from_checkpoint_reproduces_the_uninterrupted_losses(tmp_path, processor, cache):
    collator = CGMLLMDataCollator(processor, 8, condition_dropout=0.5)

    def run(out, resume=None):
        trainer = CGMLLMTrainer(model=tiny_model(processor, seed=1 if resume else 0),
                                args=_args(out, max_steps=5, save_strategy="steps", save_steps=2),
                                train_dataset=cache, data_collator=collator, ema_decay=0.5)
        trainer.train(resume_from_checkpoint=resume)
        return {e["step"]: (e["loss"], e["flow_loss"]) for e in trainer.state.log_history if "loss" in e}

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    from safetensors.torch import load_file

    ema_full, ema_resumed = (load_file(str(tmp_path / d / EMA_WEIGHTS_NAME)) for d in ("full", "resumed"))
    for name in ema_full:  # the EMA was restored from the checkpoint too
        torch.testing.assert_close(ema_resumed[name], ema_full[name], rtol=1e-5, atol=1e-6)
    assert sorted(resumed) == [1, 2, 3, 4, 5]  # 1-2 restored from the checkpoint's trainer state
    for step in (3, 4, 5):  # crosses the epoch boundary (3 steps per epoch)
        np.testing.assert_allclose(resumed[step], full[step], rtol=1e-5, atol=1e-6)


# 5. Staged training from YAML -----------------------------------------------------------------------------------------
def test_example_config_runs_all_stages(tmp_path, mesh_folder):
    from cgmllm.training.cli import train_main

    model, results = train_main(["--config", str(EXAMPLE_CONFIG), "--set", f"data.path={mesh_folder}",
                                 "--set", f"output_dir={tmp_path}"])
    assert [r["stage"] for r in results] == ["align", "progressive-4", "progressive-8"]
    assert [r["num_shape_tokens"] for r in results] == [4, 4, 8]
    assert all(np.isfinite(r["train_loss"]) for r in results)
    from cgmllm import CGMLLMForConditionalGeneration

    final = CGMLLMForConditionalGeneration.from_pretrained(results[-1]["final"])
    torch.testing.assert_close(final.llm2obj.weight, model.llm2obj.weight)
    # The longest text -> 3D prompt of the data is saved with the model (the pipeline warns beyond it).
    from cgmllm import CGMLLMProcessor

    processor = CGMLLMProcessor.from_pretrained(results[-1]["final"])
    captions = load_caption_dataset(mesh_folder)["caption"]
    longest = max(len(processor.tokenizer(processor.text_to_shape_prompt(c), add_special_tokens=False)["input_ids"])
                  for c in captions)
    assert final.config.max_prompt_tokens == longest > 0
    # Stage 2 started from stage 1's weights: its first logged loss is not the fresh-model loss.
    assert results[1]["log_history"][0]["learning_rate"] == pytest.approx(1e-3)


def test_longest_prompt_counts_the_paraphrases_the_collator_prompts_with(processor):
    # The collator draws text -> 3D prompts from `captions` when the data has it (the tiny world does): a model
    # trained on those paraphrases must not warn about them later.
    from types import SimpleNamespace

    from cgmllm.training.cli import record_longest_prompt

    def length(text):
        return len(processor.tokenizer(processor.text_to_shape_prompt(text), add_special_tokens=False)["input_ids"])

    long = "a 3D model of a box that is wider than it is tall, tilted at an angle and resting on its side"
    data = Dataset.from_dict({"caption": ["a box", "a ball"], "captions": [["a box", long], None]})
    model = SimpleNamespace(config=SimpleNamespace(max_prompt_tokens=None))
    record_longest_prompt(model, processor, data)
    assert model.config.max_prompt_tokens == length(long) > length("a box")
    record_longest_prompt(model, processor, data.remove_columns("captions"))  # a longer known value is kept
    assert model.config.max_prompt_tokens == length(long)
    model.config.max_prompt_tokens = None
    record_longest_prompt(model, processor, data.remove_columns("captions"))
    assert model.config.max_prompt_tokens == max(length("a box"), length("a ball"))


def test_set_overrides_reach_nested_keys_and_list_items():
    from cgmllm.training.cli import load_config

    config = load_config(EXAMPLE_CONFIG, ["stages.0.max_steps=7", "stages.-1.learning_rate=[1.0e-4, 2.0e-5]",
                                          "training.logging_steps=3", "tasks.image_caption=0.5"])
    stages = config["stages"]  # expanded: the progressive stage has one entry per resolution
    assert stages[0].max_steps == 7 and stages[-1].learning_rate == pytest.approx(2e-5)
    assert config["training"]["logging_steps"] == 3 and config["tasks"]["image_caption"] == 0.5
    with pytest.raises(ValueError, match="stages is a list of 2; expected an index, got 'align'"):
        load_config(EXAMPLE_CONFIG, ["stages.align.max_steps=7"])
    with pytest.raises(ValueError, match="stages is a list of 2; expected an index, got '5'"):
        load_config(EXAMPLE_CONFIG, ["stages.5.max_steps=7"])
    with pytest.raises(ValueError, match="seed is a int, not a mapping or list"):
        load_config(EXAMPLE_CONFIG, ["seed.value=1"])


def test_config_errors_name_the_key_or_stage(tmp_path):
    import yaml

    from cgmllm.training.cli import load_config
    from cgmllm.training.stages import expand_stages

    base = yaml.safe_load(EXAMPLE_CONFIG.read_text())

    def check(mutate, match):
        config = yaml.safe_load(yaml.safe_dump(base))
        mutate(config)
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(config))
        with pytest.raises(ValueError, match=match):
            load_config(path)

    check(lambda c: c.update(lr_warmup=3), "lr_warmup")
    check(lambda c: c["training"].update(not_an_arg=1), "training.not_an_arg")
    check(lambda c: c["stages"][0].update(dropout=0.5), "'align'.*dropout")
    check(lambda c: c["stages"].reverse(), "'align'.*alignment stage cannot come after")
    check(lambda c: c["stages"][1].update(num_shape_tokens=[8, 4]), "'progressive-4'.*resolution only grows")
    check(lambda c: c["stages"][1].update(condition_dropout=[0.1, 0.9]), "'progressive-8'.*dropout only decreases")
    stages = expand_stages([{"name": "s1", "kind": "alignment", "num_shape_tokens": 512, "condition_dropout": 0.9,
                             "learning_rate": 1e-4},
                            {"name": "s2", "num_shape_tokens": [512, 1024, 2048, 4096],
                             "condition_dropout": [0.9, 0.1], "learning_rate": [1e-4, 5e-5]}])
    assert [s.num_shape_tokens for s in stages] == [512, 512, 1024, 2048, 4096]
    assert [round(s.condition_dropout, 4) for s in stages] == [0.9, 0.9, 0.6333, 0.3667, 0.1]
    assert stages[-1].learning_rate == pytest.approx(5e-5)
    assert [s.max_steps for s in stages] == [-1] * 5
    stages = expand_stages([{"name": "s2", "kind": "progressive", "num_shape_tokens": [16, 32, 64],
                             "condition_dropout": 0.1, "learning_rate": 1e-3, "max_steps": [100, 200, 400]}])
    assert [s.max_steps for s in stages] == [100, 200, 400]
    with pytest.raises(ValueError, match="'s2'.*'max_steps'"):
        expand_stages([{"name": "s2", "kind": "progressive", "num_shape_tokens": [16, 32, 64],
                        "condition_dropout": 0.1, "learning_rate": 1e-3, "max_steps": [1, 2, 3, 4]}])
