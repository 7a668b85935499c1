"""Checkpoint builders and the converter for the official release.

    cgmllm-build --qwen3-vl QWEN_DIR --shape-vae VAE --out DIR
        a fresh CG-MLLM from Qwen3-VL (BlockAR copied from TokenAR, new connector, zero velocity head), its processor
        and the Hunyuan3D-2.1 ShapeVAE, written as a pipeline folder.

    cgmllm-build --refresh-remote-code DIR [--check]
        rewrite the remote-code copies (`*.py`, `auto_map`) of a saved pipeline folder from the installed package
        (`remote_code.refresh_remote_code`), e.g. after changing a model file, for the shipped checkpoints/tiny-world.

    cgmllm-convert-official --ema ema.safetensors --qwen3-vl QWEN_DIR --shape-vae VAE --out DIR [--point-bert PT]
        a released checkpoint renamed into this package's layout (official_cgmllm.md §1.5). Both releases work:
        `JreamH/CGMLLM` (Qwen3-VL-2B backbone, all tasks) and `JreamH/CGMLLM-4B-i2o` (Qwen3-VL-4B, image -> 3D only,
        no `obj_understanding` connector); every size comes from the checkpoint header and the Qwen3-VL folder
        (which must be the matching backbone: a hidden-size mismatch stops the conversion before any weight loads):

            language_model.model.X     -> model.language_model.X      (TokenAR, BlockAR `*_block_ar`, norms)
            language_model.lm_head.weight -> lm_head.weight           (tied; taken from embed_tokens if absent)
            vit_model.X                -> model.visual.X
            time_embedder.X / obj2llm.X -> model.time_embedder.X / model.obj2llm.X
            obj_und_connector.X        -> model.obj_und_connector.X   (3D understanding; its input width, 1152 for
                                                                       PointBERT or 64 for VAE latents, sets
                                                                       `config.point_feature_dim`)
            llm2obj.X                  -> llm2obj.X

        `--point-bert point_bert_v1.1.pt` adds PointLLM's PointBERT as the pipeline's `point_encoder`, so that
        `pipe.caption(mesh=...)` follows the official 3D-captioning path.

        Vocabulary: the official matrix has R rows (151671 for the 2B release: Qwen's 151669 tokens +
        `<|obj_start|>`, `<|obj_end|>`). The converted model has one row per tokenizer entry: with the stock Qwen3-VL
        tokenizer that is the R official rows at the same ids plus one row for this package's extra `<|obj_pad|>`
        token (id R; its input embedding is always replaced by a latent or point feature, so it is initialised to the
        mean row). For a tokenizer that puts the 3D tokens elsewhere, rows 0..R-3 keep their ids and rows R-2 / R-1
        move to its `<|obj_start|>` / `<|obj_end|>` ids. An embedding and an `lm_head` with different row counts,
        an unmapped official key or an unfilled model weight stop the conversion with the names.

Both write `DIR/` with `CGMLLMPipeline.save_pretrained` when the pipeline class is available, else the subfolders
`model/`, `processor/`, `vae/`.
"""

import argparse
import json
import logging
import os

import torch


logger = logging.getLogger(__name__)

RENAMES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vit_model.", "model.visual."),
    ("time_embedder.", "model.time_embedder."),
    ("obj2llm.", "model.obj2llm."),
    ("obj_und_connector.", "model.obj_und_connector."),
    ("llm2obj.", "llm2obj."),
)
OFFICIAL_EMBED_KEY = "language_model.model.embed_tokens.weight"
OFFICIAL_LM_HEAD_KEY = "language_model.lm_head.weight"
OFFICIAL_CONNECTOR_KEY = "obj_und_connector.fc1.weight"
EMBED_KEY = "model.language_model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"


def rename_official_key(key: str) -> str | None:
    for old, new in RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def convert_official_state_dict(official: dict, model, obj_start_id: int, obj_end_id: int, obj_pad_id: int):
    """Map an official state dict onto `model` (a `CGMLLMForConditionalGeneration` of matching sizes).

    Returns `(state_dict, summary)`; raises `ValueError` naming unmapped official keys, model weights left
    unfilled, or shape mismatches.
    """
    target = model.state_dict()
    check_official_vocabulary({k: tuple(v.shape) for k, v in official.items() if k in (OFFICIAL_EMBED_KEY,
                                                                                         OFFICIAL_LM_HEAD_KEY)})
    converted, unknown = {}, []
    for key, value in official.items():
        new = rename_official_key(key)
        if new is None or new not in target:
            unknown.append(key if new is None else f"{key} (-> {new})")
            continue
        converted[new] = value
    if unknown:
        raise ValueError(f"Official keys with no place in CG-MLLM ({len(unknown)}): {sorted(unknown)[:20]}")

    if LM_HEAD_KEY not in converted and EMBED_KEY in converted:
        converted[LM_HEAD_KEY] = converted[EMBED_KEY]
    if EMBED_KEY in converted and LM_HEAD_KEY in converted and \
            converted[EMBED_KEY].shape[0] != converted[LM_HEAD_KEY].shape[0]:
        # Both are mapped row by row onto one vocabulary: different counts mean a truncated or foreign tensor.
        raise ValueError(
            f"The official embedding has {converted[EMBED_KEY].shape[0]} rows but its lm_head has "
            f"{converted[LM_HEAD_KEY].shape[0]}; both must cover the same vocabulary."
        )
    vocab_info = {}
    for key in (EMBED_KEY, LM_HEAD_KEY):
        if key not in converted:
            continue
        rows = converted[key]
        ours = target[key]
        num_rows = rows.shape[0]
        if rows.shape[1] != ours.shape[1]:
            raise ValueError(f"{key}: official hidden size {rows.shape[1]} != model hidden size {ours.shape[1]}.")
        if num_rows - 2 > ours.shape[0] or max(obj_start_id, obj_end_id, obj_pad_id) >= ours.shape[0]:
            raise ValueError(
                f"{key}: the model has {ours.shape[0]} rows, too few for the {num_rows} official rows / 3D token ids."
            )
        new_rows = ours.clone().to(rows.dtype)
        new_rows[: num_rows - 2] = rows[: num_rows - 2]
        new_rows[obj_start_id] = rows[num_rows - 2]
        new_rows[obj_end_id] = rows[num_rows - 1]
        new_rows[obj_pad_id] = rows.float().mean(0).to(rows.dtype)
        converted[key] = new_rows
        vocab_info = {"official_rows": int(num_rows), "model_rows": int(ours.shape[0]),
                      "obj_start": [int(num_rows - 2), obj_start_id], "obj_end": [int(num_rows - 1), obj_end_id],
                      "obj_pad_init": "mean of the official rows"}

    missing = sorted(set(target) - set(converted))
    if missing:
        raise ValueError(f"Model weights not found in the official checkpoint ({len(missing)}): {missing[:20]}")
    mismatched = [f"{k}: official {tuple(v.shape)} vs model {tuple(target[k].shape)}"
                  for k, v in converted.items() if tuple(v.shape) != tuple(target[k].shape)]
    if mismatched:
        raise ValueError(f"Shape mismatches: {mismatched[:20]}")
    summary = {"num_official_keys": len(official), "num_converted": len(converted),
               "vocab": vocab_info, "dtypes": sorted({str(v.dtype) for v in official.values()})}
    return converted, summary


def read_official_header(ema) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an `ema.safetensors`, read from its header only (no tensor is loaded)."""
    from safetensors import safe_open

    path = os.fspath(ema)
    if not os.path.isfile(path):
        raise ValueError(f"No official checkpoint at {path!r}.")
    try:
        with safe_open(path, framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:  # not a safetensors file
        raise ValueError(f"{path!r} is not a safetensors checkpoint: {error}") from error


def check_official_vocabulary(shapes: dict) -> int | None:
    """The official vocabulary size from the embedding / lm_head shapes; a disagreement is an error."""
    embed, head = shapes.get(OFFICIAL_EMBED_KEY), shapes.get(OFFICIAL_LM_HEAD_KEY)
    if embed is not None and head is not None and embed[0] != head[0]:
        raise ValueError(
            f"The official checkpoint's embedding has {embed[0]} rows but its lm_head has {head[0]}; the release ties "
            "them, so this file is not a CG-MLLM release (or is damaged)."
        )
    return embed[0] if embed is not None else (head[0] if head is not None else None)


def describe_official_header(shapes: dict) -> dict:
    """What the header says: backbone sizes, vocabulary, the 3D-understanding connector's input width."""
    if OFFICIAL_EMBED_KEY not in shapes and OFFICIAL_LM_HEAD_KEY not in shapes:
        raise ValueError(
            f"The checkpoint has neither {OFFICIAL_EMBED_KEY!r} nor {OFFICIAL_LM_HEAD_KEY!r}; it is not an official "
            "CG-MLLM `ema.safetensors`."
        )
    rows = check_official_vocabulary(shapes)
    hidden = (shapes.get(OFFICIAL_EMBED_KEY) or shapes[OFFICIAL_LM_HEAD_KEY])[1]
    layers = {int(k.split(".")[3]) for k in shapes if k.startswith("language_model.model.layers.")}
    connector = shapes.get(OFFICIAL_CONNECTOR_KEY)
    return {"vocab_rows": rows, "hidden_size": hidden, "num_hidden_layers": len(layers),
            "point_feature_dim": connector[1] if connector is not None else None}


# ----------------------------------------------------------------------------------------------------------------
def save_pipeline_folder(out, model, processor, vae, point_encoder=None) -> str:
    """Write the pipeline folder (CGMLLMPipeline layout when available, else model/processor/vae subfolders)."""
    os.makedirs(out, exist_ok=True)
    try:
        from cgmllm.pipelines import CGMLLMPipeline
    except ImportError:
        try:
            from cgmllm.pipelines.pipeline_cgmllm import CGMLLMPipeline
        except ImportError:
            CGMLLMPipeline = None
    if CGMLLMPipeline is not None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        components = {"point_encoder": point_encoder} if point_encoder is not None else {}
        pipe = CGMLLMPipeline(model=model, vae=vae, scheduler=scheduler, processor=processor, **components)
        pipe.save_pretrained(out)
        return "pipeline"
    if point_encoder is not None:
        point_encoder.save_pretrained(os.path.join(out, "point_encoder"))
    model.save_pretrained(os.path.join(out, "model"))
    processor.save_pretrained(os.path.join(out, "processor"))
    vae.save_pretrained(os.path.join(out, "vae"))
    return "subfolders"


def _dtype(name):
    return None if name in (None, "auto") else getattr(torch, name)


def build(qwen3_vl, shape_vae, out, num_shape_tokens: int = 4096, torch_dtype=None):
    model, processor, vae = _build_in_memory(qwen3_vl, shape_vae, num_shape_tokens, torch_dtype, "qwen3_vl")
    layout = save_pipeline_folder(out, model, processor, vae)
    return model, processor, vae, layout


def convert_official(ema, qwen3_vl, shape_vae, out, num_shape_tokens: int = 4096, torch_dtype=None,
                     point_bert=None):
    from safetensors.torch import load_file

    header = describe_official_header(read_official_header(ema))
    _check_backbone(header, qwen3_vl)
    point_encoder = None
    if point_bert is not None:
        if header["point_feature_dim"] is None:
            raise ValueError(
                "--point-bert was given, but the checkpoint has no `obj_und_connector` (an image -> 3D only release "
                "such as JreamH/CGMLLM-4B-i2o): it cannot caption 3D objects."
            )
        from cgmllm import PointBERTEncoder

        # PointLLM's sizes, at the width the checkpoint's connector takes (1152 for the release); a file of another
        # width fails with its shapes listed.
        point_encoder = PointBERTEncoder.from_pointllm(point_bert, trans_dim=header["point_feature_dim"])
    # The released weights saw the official image preprocessing (resize rule, JPEG round trip for image -> 3D).
    model, processor, vae = _build_in_memory(qwen3_vl, shape_vae, num_shape_tokens, torch_dtype, "official",
                                             point_feature_dim=header["point_feature_dim"])
    # One embedding row per tokenizer entry (the official rows + `<|obj_pad|>` with the stock tokenizer).
    if model.get_input_embeddings().weight.shape[0] != len(processor.tokenizer):
        model.resize_token_embeddings(len(processor.tokenizer))
    official = load_file(os.fspath(ema))
    ids = processor.special_token_ids
    state, summary = convert_official_state_dict(official, model, ids["obj_start_token_id"],
                                                 ids["obj_end_token_id"], ids["obj_pad_token_id"])
    model.load_state_dict(state, strict=True)
    summary["header"] = header
    summary["point_encoder"] = os.fspath(point_bert) if point_bert is not None else None
    summary["layout"] = save_pipeline_folder(out, model, processor, vae, point_encoder)
    with open(os.path.join(out, "conversion_summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    logger.info("Converted %d keys (hidden %d, %d layers, %d vocabulary rows, 3D-understanding input %s).",
                summary["num_converted"], header["hidden_size"], header["num_hidden_layers"], header["vocab_rows"],
                header["point_feature_dim"])
    return model, summary


def _check_backbone(header: dict, qwen3_vl) -> None:
    """The Qwen3-VL folder must be the checkpoint's backbone (2B for JreamH/CGMLLM, 4B for JreamH/CGMLLM-4B-i2o)."""
    from transformers import AutoConfig

    try:
        text = AutoConfig.from_pretrained(os.fspath(qwen3_vl)).get_text_config()
    except Exception as error:
        raise ValueError(f"Could not read a Qwen3-VL config from {os.fspath(qwen3_vl)!r}: {error}") from error
    ours = {"hidden_size": text.hidden_size, "num_hidden_layers": text.num_hidden_layers}
    theirs = {key: header[key] for key in ours}
    if ours != theirs:
        raise ValueError(
            f"The checkpoint's backbone has {theirs} but the Qwen3-VL folder {os.fspath(qwen3_vl)!r} has {ours}; pass "
            "the matching Qwen3-VL (Qwen3-VL-2B-Instruct for JreamH/CGMLLM, Qwen3-VL-4B-Instruct for "
            "JreamH/CGMLLM-4B-i2o)."
        )


def _build_in_memory(qwen3_vl, shape_vae, num_shape_tokens, torch_dtype, image_preprocessing,
                     point_feature_dim=None):
    from cgmllm import CGMLLMForConditionalGeneration, CGMLLMProcessor
    from cgmllm.modeling_shape_vae import ShapeVAE

    processor = CGMLLMProcessor.from_qwen3_vl(qwen3_vl, num_shape_tokens=num_shape_tokens,
                                              image_preprocessing=image_preprocessing)
    vae = ShapeVAE.from_hunyuan3d(shape_vae, torch_dtype=torch_dtype)
    model = CGMLLMForConditionalGeneration.from_qwen3_vl(
        qwen3_vl, torch_dtype=torch_dtype, num_shape_tokens=num_shape_tokens,
        shape_latent_channels=vae.config.embed_dim, point_feature_dim=point_feature_dim,
    )
    return model, processor, vae


def _common_args(parser, required=True):
    parser.add_argument("--qwen3-vl", required=required, help="local Qwen3-VL folder (weights, tokenizer, processor)")
    parser.add_argument("--shape-vae", required=required, help="Hunyuan3D-2.1 VAE checkpoint or folder")
    parser.add_argument("--out", required=required)
    parser.add_argument("--num-shape-tokens", type=int, default=4096)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def _build_parser():
    parser = argparse.ArgumentParser(prog="cgmllm-build", description="Build a CG-MLLM pipeline folder from Qwen3-VL.")
    _common_args(parser, required=False)
    parser.add_argument("--refresh-remote-code", metavar="PIPELINE_DIR",
                        help="instead of building: rewrite the code files (and auto_map entries) of a saved pipeline "
                             "folder from the installed package")
    parser.add_argument("--check", action="store_true",
                        help="with --refresh-remote-code: only list the stale files (exit status 1 if any)")
    return parser


def build_main(argv=None):
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.refresh_remote_code is None:
        missing = [flag for flag, value in (("--qwen3-vl", args.qwen3_vl), ("--shape-vae", args.shape_vae),
                                            ("--out", args.out)) if value is None]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)} "
                         "(or --refresh-remote-code PIPELINE_DIR)")
    elif args.qwen3_vl or args.shape_vae or args.out:
        parser.error("--refresh-remote-code takes only a pipeline folder (and --check), not --qwen3-vl / "
                     "--shape-vae / --out")
    logging.basicConfig(level=logging.INFO)
    if args.refresh_remote_code is not None:
        from .remote_code import refresh_remote_code

        stale = refresh_remote_code(args.refresh_remote_code, check=args.check)
        if args.check and stale:
            parser.exit(1, "".join(f"stale: {name}\n" for name in stale)
                        + f"Fix: cgmllm-build --refresh-remote-code {args.refresh_remote_code}\n")
        print("\n".join(f"rewrote: {name}" for name in stale) or f"{args.refresh_remote_code}: remote code up to date")
        return stale
    return build(args.qwen3_vl, args.shape_vae, args.out, args.num_shape_tokens, _dtype(args.dtype))


def convert_main(argv=None):
    parser = argparse.ArgumentParser(prog="cgmllm-convert-official",
                                     description="Convert the official CG-MLLM ema.safetensors.")
    parser.add_argument("--ema", required=True, help="official ema.safetensors (JreamH/CGMLLM or CGMLLM-4B-i2o)")
    parser.add_argument("--point-bert", default=None,
                        help="PointLLM's point_bert_v1.1.pt: adds the PointBERT encoder for 3D captioning")
    _common_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    return convert_official(args.ema, args.qwen3_vl, args.shape_vae, args.out, args.num_shape_tokens,
                            _dtype(args.dtype), point_bert=args.point_bert)


def build_script(argv=None) -> int:
    """The `cgmllm-build` console script (exit status 0; `build_main` returns the built objects, or the stale files
    of `--refresh-remote-code`, and exits 1 itself for `--check` on a stale folder)."""
    build_main(argv)
    return 0


def convert_script(argv=None) -> int:
    """The `cgmllm-convert-official` console script (exit status 0; `convert_main` returns the model and summary)."""
    convert_main(argv)
    return 0


__all__ = ["RENAMES", "build", "build_main", "build_script", "check_official_vocabulary", "convert_main",
           "convert_official", "convert_official_state_dict", "convert_script", "describe_official_header",
           "read_official_header", "rename_official_key", "save_pipeline_folder"]
