"""`cgmllm-train --config CONFIG.yaml [--set key.sub=value ...]`: staged training from one YAML file.

Top-level keys (anything else is an error):

    output_dir   where each stage writes `<stage>/checkpoint-*` and `<stage>/final` (model + processor)
    seed         run seed
    model        {pretrained: FOLDER}  a saved CG-MLLM (model + processor), or
                 {tiny: {...}}         a tiny random model + BBPE tokenizer trained on the captions (smoke tests)
    shape_vae    ShapeVAE folder / Hunyuan3D checkpoint, or "tiny"; needed unless `data` is a latent cache
    data         {path, layout, caption_column, skip_bad_samples, streaming, num_proc}; a `cgmllm-preprocess` cache
                 folder is used as is; `streaming: true` reads (and encodes) the data lazily (stages need max_steps)
    tasks        task weights for the collator (text_to_shape, image_to_shape, shape_caption, image_caption)
    ema_decay    EMA of the weights (e.g. 0.9999), saved as ema.safetensors with every checkpoint
    training     extra `transformers.TrainingArguments` fields (batch size, bf16, gradient_checkpointing, ...)
    stages       see `cgmllm.training.stages`
"""

import argparse
import dataclasses
import logging
import os

import yaml
from transformers import TrainingArguments

from .stages import expand_stages


logger = logging.getLogger(__name__)

TOP_LEVEL_KEYS = {"output_dir", "seed", "model", "shape_vae", "data", "tasks", "ema_decay", "training", "stages"}
DATA_KEYS = {"path", "layout", "caption_column", "skip_bad_samples", "streaming", "num_proc"}
MODEL_KEYS = {"pretrained", "tiny"}
# Set by the stage, not by `training:`.
STAGE_OWNED = {"output_dir", "learning_rate", "max_steps", "num_train_epochs", "seed", "remove_unused_columns"}


def _apply_override(config: dict, assignment: str) -> None:
    """`key.sub=value` (YAML value) into the config; an integer part indexes a list (`stages.0.max_steps=10`)."""
    if "=" not in assignment:
        raise ValueError(f"--set expects key.sub=value, got {assignment!r}.")
    key, value = assignment.split("=", 1)
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the config"
        if isinstance(node, list):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                raise ValueError(f"--set {key}: {where} is a list of {len(node)}; expected an index, got {part!r}.")
            part = int(part)
        elif not isinstance(node, dict):
            raise ValueError(f"--set {key}: {where} is a {type(node).__name__}, not a mapping or list.")
        if depth == len(parts) - 1:
            node[part] = yaml.safe_load(value)
        else:
            node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]


def load_config(path, overrides=()) -> dict:
    """Read and validate a training YAML; relative paths are resolved against the config's folder."""
    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    for assignment in overrides:
        _apply_override(config, assignment)
    unknown = sorted(set(config) - TOP_LEVEL_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {unknown}; allowed: {sorted(TOP_LEVEL_KEYS)}.")
    for section, allowed in (("data", DATA_KEYS), ("model", MODEL_KEYS)):
        bad = sorted(set(config.get(section) or {}) - allowed)
        if bad:
            raise ValueError(f"{path}: unknown key(s) {[f'{section}.{k}' for k in bad]}; allowed: {sorted(allowed)}.")
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key in config.get("training") or {}:
        if key not in fields:
            raise ValueError(f"{path}: unknown key 'training.{key}' (not a transformers.TrainingArguments field).")
        if key in STAGE_OWNED:
            raise ValueError(f"{path}: 'training.{key}' is set per stage or at the top level, not under training.")
    if "data" not in config or "path" not in (config["data"] or {}):
        raise ValueError(f"{path}: missing 'data.path'.")
    base = os.path.dirname(os.path.abspath(path))

    def resolve(value):
        return value if value is None or os.path.isabs(str(value)) or value == "tiny" else os.path.join(base, value)

    config["data"]["path"] = resolve(config["data"]["path"])
    config["output_dir"] = resolve(config.get("output_dir", "runs/cgmllm"))
    config["shape_vae"] = resolve(config.get("shape_vae"))
    if (config.get("model") or {}).get("pretrained"):
        config["model"]["pretrained"] = resolve(config["model"]["pretrained"])
    config["stages"] = expand_stages(config.get("stages"))
    return config


def _is_cache(path) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "state.json"))


def build_components(config: dict):
    """(model, processor, dataset, vae) for a validated config."""
    import torch
    from datasets import Dataset, load_from_disk

    from .data import load_caption_dataset
    from .testing import tiny_model, tiny_processor, tiny_vae

    data_cfg = config["data"]
    if _is_cache(data_cfg["path"]):
        dataset = load_from_disk(data_cfg["path"])
    else:
        dataset = load_caption_dataset(data_cfg["path"], layout=data_cfg.get("layout", "auto"),
                                       caption_column=data_cfg.get("caption_column", "caption"),
                                       skip_bad_samples=bool(data_cfg.get("skip_bad_samples", False)),
                                       streaming=bool(data_cfg.get("streaming", False)),
                                       num_proc=data_cfg.get("num_proc"))
    model_cfg = config.get("model") or {}
    torch.manual_seed(int(config.get("seed", 0)))
    if model_cfg.get("pretrained"):
        from cgmllm import CGMLLMForConditionalGeneration, CGMLLMProcessor

        model = CGMLLMForConditionalGeneration.from_pretrained(model_cfg["pretrained"])
        processor = CGMLLMProcessor.from_pretrained(model_cfg["pretrained"])
    elif model_cfg.get("tiny") is not None:
        tiny = model_cfg["tiny"] if isinstance(model_cfg["tiny"], dict) else {}
        # A streamed set trains the tiny tokenizer on its first captions (it cannot be indexed by column).
        texts = dataset["caption"] if isinstance(dataset, Dataset) else [row["caption"] for row in dataset.take(10_000)]
        processor = tiny_processor([text for text in texts if text], vocab_size=int(tiny.pop("vocab_size", 300)))
        model = tiny_model(processor, seed=int(config.get("seed", 0)), **tiny)
    else:
        raise ValueError("The config needs `model.pretrained: FOLDER` or `model.tiny: {...}`.")
    vae = None
    if config.get("shape_vae") == "tiny":
        vae = tiny_vae(embed_dim=model.config.shape_latent_channels)
    elif config.get("shape_vae"):
        from .preprocess import load_shape_vae

        vae = load_shape_vae(config["shape_vae"])
    return model, processor, dataset, vae


def run_stages(config: dict):
    """Train every stage in order; each continues from the weights the previous stage ended with."""
    from .collator import CGMLLMDataCollator
    from .preprocess import encode_dataset
    from .trainer import CGMLLMTrainer

    model, processor, dataset, vae = build_components(config)
    seed = int(config.get("seed", 0))
    encoded = {}
    results = []
    for stage in config["stages"]:
        stage_dir = os.path.join(config["output_dir"], stage.name)
        n = stage.num_shape_tokens
        train_data = dataset
        if not {f"latents_{n}", "latents"} & set(dataset.column_names):
            if vae is None:
                raise ValueError(f"Stage {stage.name!r}: the data has no latents for N={n} and no `shape_vae` is set.")
            if n not in encoded:
                encoded[n] = encode_dataset(dataset, vae, n, seed=seed)
            train_data = encoded[n]
        collator = CGMLLMDataCollator(
            processor, n, task_weights=stage.task_weights or config.get("tasks") or
            {"text_to_shape": 1.0, "shape_caption": 1.0}, condition_dropout=stage.condition_dropout,
            max_tokens=stage.max_tokens, seed=seed,
        )
        training = dict(config.get("training") or {})
        for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(stage, key) is not None:
                training[key] = getattr(stage, key)
        training.setdefault("report_to", [])
        args = TrainingArguments(output_dir=stage_dir, learning_rate=stage.learning_rate, max_steps=stage.max_steps,
                                 num_train_epochs=stage.num_train_epochs, seed=seed, remove_unused_columns=False,
                                 **training)
        logger.info("Stage %s: N=%d, dropout=%.2f, lr=%.2e", stage.name, n, stage.condition_dropout,
                    stage.learning_rate)
        trainer = CGMLLMTrainer(model=model, args=args, train_dataset=train_data, data_collator=collator,
                                processing_class=processor, ema_decay=config.get("ema_decay"))
        output = trainer.train()
        final = os.path.join(stage_dir, "final")
        trainer.save_model(final)
        results.append({"stage": stage.name, "num_shape_tokens": n, "train_loss": output.training_loss,
                        "log_history": trainer.state.log_history, "final": final})
        model = trainer.model
    return model, results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cgmllm-train", description="Staged CG-MLLM training from a YAML config.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config entry, e.g. --set data.path=/data --set training.bf16=true")
    return parser


def train_main(argv=None):
    """Run the stages of a config; returns `(model, results)` for Python callers (`train_script` is the command)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    config = load_config(args.config, args.overrides)
    return run_stages(config)


def train_script(argv=None) -> int:
    """The `cgmllm-train` console script: exit status 0 (a console script's return value becomes the exit status)."""
    import torch.distributed as dist

    try:
        train_main(argv)
    finally:
        # Under torchrun, tear gloo/NCCL down before interpreter exit: leaving it to the destructors can abort
        # ("terminate called without an active exception") after training has finished.
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


__all__ = ["build_components", "load_config", "run_stages", "train_main", "train_script"]
