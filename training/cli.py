"""`cgmllm-train --config CONFIG.yaml [--set key.sub=value ...]`: staged training from one YAML file.

Top-level keys (anything else is an error):

    output_dir   where each stage writes `<stage>/checkpoint-*` and `<stage>/final` (model + processor)
    seed         run seed
    model        {pretrained: FOLDER}  a saved CG-MLLM (model + processor), or
                 {tiny: {...}}         a tiny random model + BBPE tokenizer trained on the captions (smoke tests)
    shape_vae    ShapeVAE folder / Hunyuan3D checkpoint, or "tiny"; needed unless `data` is a latent cache
    data         {path, layout, caption_column, skip_bad_samples, streaming, num_proc}; a `cgmllm-preprocess` cache
                 folder is used as is; `streaming: true` reads (and encodes) the data lazily (stages need max_steps)
    point_encoder  a saved `PointBERTEncoder` folder (a pipeline's `point_encoder/`) or PointLLM's
                 `point_bert_v1.1.pt`: needed when `data` is PointLLM's caption set (captioning through the model's
                 `obj_und_connector`; `model.tiny.point_feature_dim` gives a tiny model one)
    tasks        task weights for the collator (text_to_shape, image_to_shape, shape_caption, image_caption)
    ema_decay    EMA of the weights (e.g. 0.9999), saved as ema.safetensors with every checkpoint and each stage's
                 final folder; one EMA runs through all stages
    ema_restart_on_missing
                 true: resuming from a checkpoint without ema.safetensors restarts the EMA with a warning (default:
                 an error, since the EMA's history would be lost)
    training     extra `transformers.TrainingArguments` fields (batch size, bf16, gradient_checkpointing, ...)
    stages       see `cgmllm.training.stages`

Paths (`output_dir`, `data.path`, `shape_vae`, `model.pretrained`) written in the file are relative to the file's
folder; paths given with `--set` (and the default `output_dir`, `runs/cgmllm`) are relative to the current directory.
Values are type-checked (`--set ema_decay=abc` is an error naming the key and the expected type).

Resuming. `--resume` continues the run in `output_dir`: stages whose `final` folder exists are done; the first
other stage resumes from its newest complete checkpoint (incomplete ones are skipped, with a warning naming them),
or starts from the previous stage's final weights and EMA. `--resume CHECKPOINT` resumes from that checkpoint
folder (`<output_dir>/<stage>/checkpoint-<step>`: its parent folder names the stage). Without `--resume`, an
`output_dir` that already holds checkpoints is an error rather than being overwritten.
"""

import argparse
import dataclasses
import logging
import os

import yaml
from transformers import TrainingArguments

from .checkpointing import (PREFIX_CHECKPOINT_DIR, check_resumable, checkpoint_step, from_pretrained_strict,
                            last_complete_checkpoint)
from .stages import expand_stages


logger = logging.getLogger(__name__)

TOP_LEVEL_KEYS = {"output_dir", "seed", "model", "shape_vae", "data", "tasks", "ema_decay", "ema_restart_on_missing",
                  "training", "stages", "point_encoder"}
DATA_KEYS = {"path", "layout", "caption_column", "skip_bad_samples", "streaming", "num_proc"}
MODEL_KEYS = {"pretrained", "tiny"}
# Set by the stage, not by `training:`.
STAGE_OWNED = {"output_dir", "learning_rate", "max_steps", "num_train_epochs", "seed", "remove_unused_columns"}
# The config's schema: the type(s) each value may have ("a|b"; "list[x]" is a list of x; "null" is None).
TYPES = {
    "output_dir": "str", "seed": "int", "model": "mapping", "shape_vae": "str|null", "point_encoder": "str|null",
    "data": "mapping",
    "tasks": "mapping", "ema_decay": "float|null", "ema_restart_on_missing": "bool", "training": "mapping",
    "stages": "list",
    "data.path": "str", "data.layout": "str", "data.caption_column": "str", "data.skip_bad_samples": "bool",
    "data.streaming": "bool", "data.num_proc": "int|null",
    "model.pretrained": "str", "model.tiny": "mapping|null",
}
STAGE_TYPES = {
    "name": "str", "kind": "str", "num_shape_tokens": "int|list[int]", "condition_dropout": "float|list[float]",
    "learning_rate": "float|list[float]", "max_steps": "int|list[int]", "num_train_epochs": "float",
    "max_tokens": "int|null", "task_weights": "mapping|null", "per_device_train_batch_size": "int|null",
    "gradient_accumulation_steps": "int|null",
}
PATH_KEYS = ("output_dir", "data.path", "shape_vae", "model.pretrained", "point_encoder")


def _coerce(value, option: str):
    """`(True, value)` (a numeric string made a float) if `value` fits one type option, else `(False, None)`."""
    if option == "null":
        return value is None, value
    if option.startswith("list["):
        if not isinstance(value, list):
            return False, None
        items = [_coerce(item, option[5:-1]) for item in value]
        return all(ok for ok, _ in items), [item for _, item in items]
    if option == "float":
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return isinstance(value, (int, float)) and not isinstance(value, bool), value
    kinds = {"int": int, "bool": bool, "str": str, "mapping": dict, "list": list}[option]
    if kinds is int and isinstance(value, bool):
        return False, None
    return isinstance(value, kinds), value


def _check_type(node: dict, key: str, spec: str, name: str, origin: str) -> None:
    """Check (and coerce in place) `node[key]` against `spec`; `name` is its dotted config key."""
    for option in spec.split("|"):
        ok, value = _coerce(node[key], option)
        if ok:
            node[key] = value
            return
    expected = " or ".join(spec.replace("null", "null (~)").split("|"))
    raise ValueError(f"{origin}: {name} = {node[key]!r} is a {type(node[key]).__name__}; expected {expected}.")


def _training_arg_spec(annotation) -> str | None:
    """"int" / "float" / "bool" (optionally "|null") for the numeric and boolean `TrainingArguments` fields; None for
    the others (strings and enums are checked by `TrainingArguments` itself)."""
    import types
    import typing

    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    names = {int: "int", float: "float", bool: "bool", type(None): "null"}
    if not options or any(option not in names for option in options):
        return None
    return "|".join(names[option] for option in options)


def _check_types(config: dict, path, overridden) -> None:
    def origin(name):
        return "--set" if any(name == key or name.startswith(key + ".") for key in overridden) else str(path)

    for name, spec in TYPES.items():
        section, _, key = name.rpartition(".")
        node = config.get(section) if section else config
        if isinstance(node, dict) and key in node:
            _check_type(node, key, spec, name, origin(name))
    for task in list(config.get("tasks") or {}):
        _check_type(config["tasks"], task, "float", f"tasks.{task}", origin(f"tasks.{task}"))
    training = config.get("training") or {}
    if training:
        import typing

        hints = typing.get_type_hints(TrainingArguments)
        for key in list(training):
            spec = _training_arg_spec(hints.get(key))
            if spec is not None:
                _check_type(training, key, spec, f"training.{key}", origin(f"training.{key}"))
    for index, stage in enumerate(config.get("stages") or []):
        if isinstance(stage, dict):
            for key, spec in STAGE_TYPES.items():
                if key in stage:
                    _check_type(stage, key, spec, f"stages.{index}.{key}", origin(f"stages.{index}.{key}"))


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
    """Read and validate a training YAML. Relative paths in the file are resolved against the file's folder, relative
    paths from `overrides` (`--set`) against the current directory."""
    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    for assignment in overrides:
        _apply_override(config, assignment)
    overridden = [assignment.split("=", 1)[0] for assignment in overrides]
    unknown = sorted(set(config) - TOP_LEVEL_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {unknown}; allowed: {sorted(TOP_LEVEL_KEYS)}.")
    _check_types(config, path, overridden)
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
        if key == "resume_from_checkpoint":
            raise ValueError(f"{path}: 'training.resume_from_checkpoint' is not read by cgmllm-train (the Trainer only "
                             "takes it as an argument of train()); pass `--resume` or `--resume CHECKPOINT` instead.")
    if "data" not in config or "path" not in (config["data"] or {}):
        raise ValueError(f"{path}: missing 'data.path'.")
    config.setdefault("output_dir", None)
    for name in PATH_KEYS:
        section, _, key = name.rpartition(".")
        node = config.get(section) if section else config
        if not isinstance(node, dict) or node.get(key) is None:
            continue
        from_command_line = any(name == k or name.startswith(k + ".") for k in overridden)
        base = os.getcwd() if from_command_line else os.path.dirname(os.path.abspath(path))
        value = str(node[key])
        if not (os.path.isabs(value) or (name == "shape_vae" and value == "tiny")):
            node[key] = os.path.join(base, value)
    if config["output_dir"] is None:
        config["output_dir"] = os.path.abspath("runs/cgmllm")
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

        model = from_pretrained_strict(CGMLLMForConditionalGeneration, model_cfg["pretrained"])
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


def load_point_encoder(path):
    """A frozen `PointBERTEncoder` from a saved folder (`config.json`) or a PointLLM checkpoint (`*.pt`)."""
    from cgmllm import PointBERTEncoder

    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        encoder = PointBERTEncoder.from_pretrained(path)
    elif os.path.isfile(path):
        encoder = PointBERTEncoder.from_pointllm(path)
    else:
        raise ValueError(f"point_encoder {path} is neither a saved PointBERTEncoder folder (config.json) nor a "
                         "PointLLM checkpoint file (point_bert_v1.1.pt).")
    return encoder.eval().requires_grad_(False)


def _resume_plan(config: dict, resume) -> tuple[int, str | None]:
    """`(index of the first stage to train, checkpoint to resume it from or None)` for `resume` = None / True /
    a checkpoint folder (see the module docstring)."""
    stages = config["stages"]
    stage_dirs = [os.path.join(config["output_dir"], stage.name) for stage in stages]
    if resume is None:
        existing = [os.path.join(d, name) for d in stage_dirs if os.path.isdir(d) for name in sorted(os.listdir(d))
                    if checkpoint_step(name) is not None]
        if existing:
            raise ValueError(
                f"{config['output_dir']} already holds checkpoints ({existing[:3]}{' ...' if len(existing) > 3 else ''})"
                "; starting again would overwrite them. Pass `--resume` to continue that run, or choose another "
                "`output_dir` (or delete it)."
            )
        finished = [os.path.join(d, "final") for d in stage_dirs if os.path.isdir(os.path.join(d, "final"))]
        if finished:
            logger.warning("Replacing the finished stage folder(s) %s of an earlier run (pass --resume to keep them "
                           "and continue instead).", finished)
        return 0, None
    if resume is True:
        for index, stage_dir in enumerate(stage_dirs):
            if not os.path.isdir(os.path.join(stage_dir, "final")):
                checkpoint = last_complete_checkpoint(stage_dir)
                if index == 0 and checkpoint is None:
                    logger.warning("--resume: nothing to resume in %s; starting the first stage.", config["output_dir"])
                return index, checkpoint
        return len(stages), None
    checkpoint = check_resumable(resume)
    stage_name = os.path.basename(os.path.dirname(os.path.normpath(checkpoint)))
    names = [stage.name for stage in stages]
    if stage_name not in names:
        raise ValueError(f"--resume {resume}: its folder {stage_name!r} is not a stage of this config ({names}); "
                         f"expected <output_dir>/<stage>/{PREFIX_CHECKPOINT_DIR}-<step>.")
    return names.index(stage_name), checkpoint


def _stage_result(stage, final, train_loss, log_history, resumed_from=None, skipped=False) -> dict:
    return {"stage": stage.name, "num_shape_tokens": stage.num_shape_tokens, "train_loss": train_loss,
            "log_history": log_history, "final": final, "resumed_from": resumed_from, "skipped": skipped}


def record_longest_prompt(model, processor, dataset) -> None:
    """Set `model.config.max_prompt_tokens` to the longest text -> 3D prompt (template included) this data gives, or
    keep a longer value the model already has: the pipeline warns for prompts beyond it. The texts are those the
    collator prompts with: the `captions` paraphrases (`collator.caption_paraphrases`), else `caption`. Streamed data
    is skipped (it cannot be read twice)."""
    from datasets import Dataset

    from .collator import caption_paraphrases

    if not isinstance(dataset, Dataset) or "caption" not in dataset.column_names or len(dataset) == 0:
        return
    columns = dataset.select_columns([name for name in ("caption", "captions") if name in dataset.column_names])
    prompts = [processor.text_to_shape_prompt(text) for example in columns
               for text in caption_paraphrases(example) or [example["caption"]] if text and text.strip()]
    if not prompts:
        return
    longest = max(len(ids) for ids in processor.tokenizer(prompts, add_special_tokens=False)["input_ids"])
    model.config.max_prompt_tokens = max(longest, model.config.max_prompt_tokens or 0)


def run_stages(config: dict, resume=None):
    """Train every stage in order; each continues from the weights (and EMA) the previous stage ended with.

    `resume`: None (a fresh run), True (continue the run in `output_dir`) or a checkpoint folder. Returns
    `(model, results)`, one result per stage; stages finished by an earlier run have `skipped=True` (their loss and
    log come from their `final/trainer_state.json`).
    """
    import json

    from .collator import CGMLLMDataCollator
    from .preprocess import encode_dataset
    from .trainer import CGMLLMTrainer, load_ema_weights

    first, checkpoint = _resume_plan(config, resume)
    model, processor, dataset, vae = build_components(config)
    record_longest_prompt(model, processor, dataset)
    point_encoder = load_point_encoder(config["point_encoder"]) if config.get("point_encoder") else None
    if "point_cloud" in dataset.column_names and point_encoder is None:
        raise ValueError("The data holds PointBERT clouds (PointLLM's caption set): set `point_encoder` (a saved "
                         "PointBERTEncoder folder or PointLLM's point_bert_v1.1.pt) to caption them.")
    seed = int(config.get("seed", 0))
    ema_decay = config.get("ema_decay")
    ema_state = None
    encoded = {}
    results = []
    for index, stage in enumerate(config["stages"]):
        stage_dir = os.path.join(config["output_dir"], stage.name)
        final = os.path.join(stage_dir, "final")
        if index < first:
            state_path = os.path.join(final, "trainer_state.json")
            history = []
            if os.path.isfile(state_path):
                with open(state_path) as handle:
                    history = json.load(handle)["log_history"]
            loss = next((entry["train_loss"] for entry in reversed(history) if "train_loss" in entry), None)
            results.append(_stage_result(stage, final, loss, history, skipped=True))
            continue
        if index == first and index > 0 and checkpoint is None:
            # Starts where the finished previous stage ended: its final weights and EMA.
            from cgmllm import CGMLLMForConditionalGeneration

            previous_final = results[-1]["final"]
            logger.info("Stage %s starts from %s", stage.name, previous_final)
            model = from_pretrained_strict(CGMLLMForConditionalGeneration, previous_final)
            if ema_decay is not None:
                if os.path.isfile(os.path.join(previous_final, "ema.safetensors")):
                    ema_state = load_ema_weights(previous_final)
                elif not config.get("ema_restart_on_missing"):
                    raise ValueError(f"{previous_final} has no ema.safetensors, so the EMA cannot continue from the "
                                     "previous stage; set `ema_restart_on_missing: true` to restart it.")
        n = stage.num_shape_tokens
        train_data = dataset
        if "point_cloud" not in dataset.column_names and not {f"latents_{n}", "latents"} & set(dataset.column_names):
            if vae is None:
                raise ValueError(f"Stage {stage.name!r}: the data has no latents for N={n} and no `shape_vae` is set.")
            if n not in encoded:
                encoded[n] = encode_dataset(dataset, vae, n, seed=seed)
            train_data = encoded[n]
        collator = CGMLLMDataCollator(
            processor, n, task_weights=stage.task_weights or config.get("tasks") or
            {"text_to_shape": 1.0, "shape_caption": 1.0}, condition_dropout=stage.condition_dropout,
            max_tokens=stage.max_tokens, seed=seed, point_encoder=point_encoder,
            shape_block_size=model.config.shape_block_size,
        )
        training = dict(config.get("training") or {})
        for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(stage, key) is not None:
                training[key] = getattr(stage, key)
        training.setdefault("report_to", [])
        args = TrainingArguments(output_dir=stage_dir, learning_rate=stage.learning_rate, max_steps=stage.max_steps,
                                 num_train_epochs=stage.num_train_epochs, seed=seed, remove_unused_columns=False,
                                 **training)
        resume_from = checkpoint if index == first else None
        logger.info("Stage %s: N=%d, dropout=%.2f, lr=%.2e%s", stage.name, n, stage.condition_dropout,
                    stage.learning_rate, f", resuming from {resume_from}" if resume_from else "")
        trainer = CGMLLMTrainer(model=model, args=args, train_dataset=train_data, data_collator=collator,
                                processing_class=processor, ema_decay=ema_decay, ema_initial=ema_state,
                                ema_restart_on_missing=bool(config.get("ema_restart_on_missing", False)))
        output = trainer.train(resume_from_checkpoint=resume_from)
        trainer.save_final(final)
        results.append(_stage_result(stage, final, output.training_loss, trainer.state.log_history, resume_from))
        model = trainer.model
        ema_state = trainer.ema.shadow if trainer.ema is not None else None
    if first >= len(config["stages"]) and results:
        from cgmllm import CGMLLMForConditionalGeneration

        logger.info("--resume: every stage of %s is finished already.", config["output_dir"])
        model = from_pretrained_strict(CGMLLMForConditionalGeneration, results[-1]["final"])
    return model, results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cgmllm-train", description="Staged CG-MLLM training from a YAML config.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config entry, e.g. --set data.path=/data --set training.bf16=true "
                             "(relative paths are relative to the current directory)")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue the run in output_dir (finished stages are skipped; the current stage resumes "
                             "from its newest complete checkpoint), or resume from the given checkpoint folder")
    return parser


def train_main(argv=None):
    """Run the stages of a config; returns `(model, results)` for Python callers (`train_script` is the command)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    config = load_config(args.config, args.overrides)
    return run_stages(config, resume=args.resume)


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
