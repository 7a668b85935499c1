"""The `cgmllm` command line.

    cgmllm demo        # a tiny random CG-MLLM learns one text + 3D batch on the CPU, then captions a 3D block
    cgmllm render MESH -o outputs/preview.png [--size 256 --views 4]
    cgmllm caption MESH_OR_IMAGE [--model DIR]
    cgmllm generate "PROMPT" -o outputs/out.glb [--model DIR --steps --guidance-scale --seed --num-shape-tokens
                                                 --octree-resolution --mc-level]
    cgmllm app [--model DIR --port 7860 --share]        # the web demo (pip install "cg-mllm[app]")
    cgmllm export-space --out SPACE_DIR [--model DIR]   # a folder that runs as a Hugging Face Space
    demo / render / caption / generate also take [--threads N] [--quiet]

Start-up is cheap: this module imports only the standard library at the top, and each command imports what it
uses after its arguments have been checked, so `--help` and argument errors answer in a fraction of a second.
"""

import argparse
import os
import sys
import time
from pathlib import Path


# One set of generation defaults for the command line and the Python API (`CGMLLMPipeline.__call__` uses the same
# values): 49 Euler steps (the official 50 timesteps), CFG 7.5, marching cubes on a 128^3 grid.
DEFAULT_STEPS = 49
DEFAULT_GUIDANCE_SCALE = 7.5
DEFAULT_OCTREE_RESOLUTION = 128


def _tiny_demo_model():
    import torch

    from .configuration_cgmllm import CGMLLMConfig
    from .modeling_cgmllm import CGMLLMForConditionalGeneration

    config = CGMLLMConfig(
        text_config=dict(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, pad_token_id=0,
            rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True,
                             "rope_theta": 10000.0},
        ),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           spatial_merge_size=1, out_hidden_size=64, num_position_embeddings=16,
                           deepstack_visual_indexes=[0]),
        image_token_id=3, video_token_id=4, vision_start_token_id=5, vision_end_token_id=6,
        obj_start_token_id=120, obj_end_token_id=121, obj_pad_token_id=122,
        shape_latent_channels=64, num_shape_tokens=32,
    )
    torch.manual_seed(0)
    return CGMLLMForConditionalGeneration(config)


def run_demo(args) -> int:
    if args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps}.")
    _set_threads(args)
    import torch

    model = _tiny_demo_model().train()
    config = model.config
    n = config.num_shape_tokens
    block = [config.obj_start_token_id] + [config.obj_pad_token_id] * n + [config.obj_end_token_id]
    caption = [40, 41, 42, 43, 44]
    # One "text -> 3D" sample and one "3D -> caption" sample.
    input_ids = torch.tensor([[7, 8, 9, 10] + block + [0] * len(caption), block + [7] + caption + [2, 0, 0]])
    attention_mask = (input_ids != 0).long()
    labels = torch.where(input_ids == config.obj_pad_token_id, -100, input_ids).masked_fill(attention_mask == 0, -100)
    labels[1, : n + 3] = -100
    latents = torch.randn(2 * n, config.shape_latent_channels)
    loss_mask = torch.tensor([True] * n + [False] * n)  # the second object is a clean (understanding) block
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    print(f"CG-MLLM demo: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {n} latent rows")
    start = time.perf_counter()
    for step in range(args.steps):
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, shape_latents=latents,
                    shape_loss_mask=loss_mask)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:3d}  lm_loss {out.lm_loss.item():.3f}  flow_loss {out.flow_loss.item():.3f}")
    model.eval()
    prompt = torch.tensor([block + [7]])
    generated = model.generate(input_ids=prompt, shape_latents=latents[n:], max_new_tokens=len(caption) + 1,
                               do_sample=False)
    print(f"caption tokens for the clean 3D block: {generated[0, prompt.shape[1]:].tolist()} (target {caption + [2]})")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


class CLIError(Exception):
    """A user error: printed as `cgmllm: error: ...`, exit status 2."""


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_MODEL_NAME = "checkpoints/tiny-world"


def default_model_dir():
    """The shipped tiny-world pipeline folder, `checkpoints/tiny-world` next to the package or at the repo root."""
    here = Path(__file__).resolve().parent
    for root in (here, here.parent):
        candidate = root / DEFAULT_MODEL_NAME
        if (candidate / "model_index.json").is_file():
            return candidate
    return None


def _load_pipeline(model, quiet: bool = False):
    if model is None:
        found = default_model_dir()
        if found is None:
            here = Path(__file__).resolve().parent
            raise CLIError(
                f"no model given and no shipped pipeline folder found at {here / DEFAULT_MODEL_NAME} or "
                f"{here.parent / DEFAULT_MODEL_NAME}; pass --model DIR (a folder saved by "
                "CGMLLMPipeline.save_pretrained, with a model_index.json)."
            )
        model = found
    path = Path(model)
    if not path.is_dir():
        raise CLIError(f"--model {model}: no such directory.")
    if not (path / "model_index.json").is_file():
        raise CLIError(f"--model {model}: not a pipeline folder (no model_index.json); save one with "
                       "CGMLLMPipeline.save_pretrained.")
    if not (path / "model" / "config.json").is_file():  # checked before anything is built (see from_pretrained)
        raise CLIError(f"--model {model}: no model/config.json; the folder is incomplete (a CGMLLMPipeline folder "
                       "holds model/, vae/, scheduler/ and processor/).")
    from transformers.utils import logging as transformers_logging

    from cgmllm.pipelines import CGMLLMPipeline

    # transformers draws a "Loading weights" bar for every load: noise for a command that loads the same folder on
    # every run.
    bars_were_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        pipe = CGMLLMPipeline.from_pretrained(path)
    except Exception as error:  # corrupt / incomplete folders
        raise CLIError(f"could not load the pipeline in {model}: {type(error).__name__}: {error}") from error
    finally:
        if bars_were_enabled:
            transformers_logging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=quiet)
    return pipe


def _existing_file(path_str, what):
    path = Path(path_str)
    if not path.exists():
        raise CLIError(f"{what} {path_str}: no such file.")
    if not path.is_file():
        raise CLIError(f"{what} {path_str}: not a file.")
    return path


def _check_output(path_str, suffixes, what):
    path = Path(path_str)
    if path.suffix.lower() not in suffixes:
        raise CLIError(f"{what} {path_str}: unsupported extension, use one of {', '.join(sorted(suffixes))}.")
    if path.is_dir():
        raise CLIError(f"{what} {path_str}: is a folder; give a file name.")
    for parent in path.parents:  # the first existing ancestor must be a folder (else mkdir fails deep inside)
        if parent.exists():
            if not parent.is_dir():
                raise CLIError(f"{what} {path_str}: {parent} is a file, not a folder.")
            break
    return path


def _prepare_output(path: Path) -> str:
    """Create the output's folder (e.g. `outputs/`) if needed; returns the note for the "wrote" line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return "overwrote" if path.exists() else "wrote"


def default_num_threads() -> int:
    """Threads for torch when neither `--threads` nor `OMP_NUM_THREADS` says: the cores that are idle now.

    torch's own default (one thread per core) is the fastest on an idle machine, but on a loaded one its threads
    wait for each other: on 2 cores at a load average of 12, 2 threads made the denoising 30x slower than 1
    (`benchmarks/bench_cli.py`). So: the cores not already busy (1-minute load average), at least 1, at most 8.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(8, cores, int(cores - load + 0.5)))


def _set_threads(args) -> None:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(default_num_threads())


def run_render(args) -> int:
    path = _existing_file(args.mesh, "mesh")
    output = _check_output(args.output, {".png", ".jpg", ".jpeg", ".webp"}, "-o/--output")
    if args.size < 8:
        raise CLIError(f"--size must be at least 8 pixels, got {args.size}.")
    if args.views < 1:
        raise CLIError(f"--views must be at least 1, got {args.views}.")
    from .mesh_utils import load_mesh
    from .rendering import render_multiview

    _set_threads(args)
    try:
        mesh = load_mesh(path)
    except ValueError as error:
        raise CLIError(str(error)) from error
    image = render_multiview(mesh, image_size=args.size, num_views=args.views, columns=args.columns)
    verb = _prepare_output(output)
    image.save(output)
    print(f"{verb} {output} ({image.width}x{image.height}, {args.views} view(s) of {len(mesh.faces)} faces)")
    return 0


def read_image(path, what: str):
    """The image file in its own mode (an alpha channel is kept: the processor composites it on white or drops it, as
    the official preprocessing does for each task), or a `CLIError` naming `what` and `path`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as handle:
            handle.load()
            return handle.copy()
    except (UnidentifiedImageError, OSError) as error:
        raise CLIError(f"{what} {path}: not a readable image ({error}).") from error


def run_caption(args) -> int:
    path = _existing_file(args.input, "input")
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    _set_threads(args)
    is_image = path.suffix.lower() in _IMAGE_SUFFIXES
    if is_image:
        image = read_image(path, "input")
    else:
        from .mesh_utils import load_mesh

        try:
            mesh = load_mesh(path)
        except ValueError as error:
            raise CLIError(str(error)) from error
    pipe = _load_pipeline(args.model, args.quiet)
    try:
        if is_image:
            captions = pipe.caption(image=image, prompt=args.prompt, max_new_tokens=args.max_new_tokens)
        else:
            captions = pipe.caption(mesh=mesh, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                                    num_shape_tokens=args.num_shape_tokens)
    except ValueError as error:
        raise CLIError(str(error)) from error
    print(captions[0])
    return 0


def run_generate(args) -> int:
    output = _check_output(args.output, {".glb", ".gltf", ".obj", ".ply", ".stl", ".off"}, "-o/--output")
    if (args.prompt is None) == (args.image is None):
        raise CLIError("give either a PROMPT (text -> mesh) or --image FILE (image -> mesh), not "
                       + ("both." if args.prompt is not None else "neither."))
    if args.prompt is not None and not args.prompt.strip():
        raise CLIError("the prompt is empty.")
    if args.image is not None:
        _existing_file(args.image, "--image")
    if args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps}.")
    if args.octree_resolution < 4:
        raise CLIError(f"--octree-resolution must be at least 4, got {args.octree_resolution}.")
    condition = {"prompt": args.prompt} if args.prompt is not None else {"image": read_image(args.image, "--image")}
    _set_threads(args)
    import torch

    from .volume_decoding import check_grid_memory

    try:  # before loading and denoising: the grid is allocated only after both
        check_grid_memory(args.octree_resolution)
    except ValueError as error:
        raise CLIError(f"--octree-resolution: {error}") from error
    pipe = _load_pipeline(args.model, args.quiet)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    try:
        out = pipe(**condition, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                   num_shape_tokens=args.num_shape_tokens, generator=generator,
                   octree_resolution=args.octree_resolution, mc_level=args.mc_level)
    except ValueError as error:
        raise CLIError(str(error)) from error
    mesh = out.mesh
    if mesh is None or len(mesh.faces) == 0:
        raise CLIError(
            f"the decoded field never crosses --mc-level {args.mc_level}: no surface, nothing written. Try another "
            "--seed or --mc-level, or a trained --model."
        )
    from .mesh_utils import export_mesh

    verb = _prepare_output(output)
    written = export_mesh(mesh, output)
    note = ", buffers embedded" if output.suffix.lower() == ".gltf" else ""
    print(f"{verb} {', '.join(map(str, written))} ({len(mesh.vertices)} vertices, {len(mesh.faces)} faces{note}) "
          f"in {time.perf_counter() - start:.1f}s")
    return 0


def _require_gradio():
    try:
        import gradio  # noqa: F401
    except ImportError as error:
        raise CLIError('the web demo needs gradio: pip install "cg-mllm[app]" (or pip install gradio).') from error


def run_app(args) -> int:
    _require_gradio()
    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be between 1 and 65535, got {args.port}.")
    pipe = _load_pipeline(args.model)
    from cgmllm.app import launch_app

    print(f"serving the CG-MLLM demo on http://{args.host}:{args.port} (Ctrl-C stops it)")
    launch_app(pipe, port=args.port, share=args.share, host=args.host)
    return 0


def run_export_space(args) -> int:
    from pathlib import Path

    _require_gradio()
    model = args.model if args.model is not None else default_model_dir()
    if model is None:
        _load_pipeline(None)  # raises the "no shipped pipeline" error
    model = Path(model)
    if not (model / "model_index.json").is_file():
        raise CLIError(f"--model {model}: not a pipeline folder (no model_index.json); save one with "
                       "CGMLLMPipeline.save_pretrained.")
    from cgmllm.app import export_space

    try:
        out = export_space(model, args.out, title=args.title)
    except ValueError as error:
        raise CLIError(str(error)) from error
    print(f"wrote the Space folder {out} (app.py, requirements.txt, pipeline/); try it with `cd {out} && python "
          "app.py`, or push it to a Hugging Face Space (sdk: gradio)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cgmllm",
        description="CG-MLLM: text/image -> 3D mesh and 3D captioning.",
        epilog=(
            "examples:\n"
            "  cgmllm render chair.glb -o preview.png --size 256 --views 4\n"
            "  cgmllm caption chair.glb            # or an image: cgmllm caption photo.png\n"
            '  cgmllm generate "a tall cylinder" -o cylinder.glb --steps 30 --seed 0\n'
            "  cgmllm demo\n\n"
            f"--model defaults to the shipped pipeline folder {DEFAULT_MODEL_NAME} (at the package or repo root)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults = argparse.ArgumentDefaultsHelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=_positive_int, default=None,
                        help="CPU threads for torch; None = $OMP_NUM_THREADS if set, else the cores idle now "
                             "(1-minute load average), at most 8")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    demo = subcommands.add_parser("demo", help="train a tiny random CG-MLLM for a few steps on the CPU",
                                  formatter_class=defaults, parents=[common])
    demo.add_argument("--steps", type=int, default=60, help="training steps")
    demo.set_defaults(func=run_demo)

    render = subcommands.add_parser("render", help="render a mesh file to a multi-view PNG preview",
                                    formatter_class=defaults, parents=[common])
    render.add_argument("mesh", help="mesh file (glb, gltf, obj, ply, stl, off)")
    render.add_argument("-o", "--output", default="outputs/preview.png",
                        help="output image (png, jpg, webp); its folder is created if missing")
    render.add_argument("--size", type=int, default=256, help="side of every view in pixels")
    render.add_argument("--views", type=int, default=4, help="number of views around the object")
    render.add_argument("--columns", type=int, default=None, help="views per row; None = all in one row")
    render.set_defaults(func=run_render)

    caption = subcommands.add_parser("caption", help="describe a mesh or an image in text",
                                     formatter_class=defaults, parents=[common])
    caption.add_argument("input", metavar="MESH_OR_IMAGE",
                         help="mesh file (glb, obj, ply, ...) or image (png, jpg, ...), chosen by extension")
    caption.add_argument("--model", default=None, help=f"pipeline folder; None = the shipped {DEFAULT_MODEL_NAME}")
    caption.add_argument("--prompt", default=None, help="question; None = the processor's describe prompt")
    caption.add_argument("--max-new-tokens", type=int, default=64, help="caption length budget")
    caption.add_argument("--num-shape-tokens", type=int, default=None,
                         help="latent rows for a mesh; None = the model's")
    caption.set_defaults(func=run_caption)

    generate = subcommands.add_parser("generate", help="generate a mesh from a text prompt or an image",
                                      formatter_class=defaults, parents=[common])
    generate.add_argument("prompt", metavar="PROMPT", nargs="?", default=None,
                          help="text prompt, e.g. \"a tall cylinder\" (or give --image)")
    generate.add_argument("--image", default=None, help="image file (png, jpg, ...) to generate from instead")
    generate.add_argument("-o", "--output", default="outputs/out.glb",
                          help="output mesh (glb, gltf with embedded buffers, obj, ply, stl, off); its folder is "
                               "created if missing")
    generate.add_argument("--model", default=None, help=f"pipeline folder; None = the shipped {DEFAULT_MODEL_NAME}")
    generate.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                          help="Euler denoising steps (S steps = the official --num_timesteps S + 1)")
    generate.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE,
                          help="classifier-free guidance (<=1: off)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    generate.add_argument("--num-shape-tokens", type=int, default=None,
                          help="latent rows N; None = the model's num_shape_tokens")
    generate.add_argument("--octree-resolution", type=int, default=DEFAULT_OCTREE_RESOLUTION,
                          help="marching-cubes grid cells per axis")
    generate.add_argument("--mc-level", type=float, default=0.0, help="iso-level of the decoded field")
    generate.set_defaults(func=run_generate)

    app = subcommands.add_parser("app", help="serve the web demo (gradio) in the browser", formatter_class=defaults)
    app.add_argument("--model", default=None, help=f"pipeline folder; None = the shipped {DEFAULT_MODEL_NAME}")
    app.add_argument("--port", type=int, default=7860, help="port to serve on")
    app.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    app.add_argument("--share", action=argparse.BooleanOptionalAction, default=False,
                     help="also open a public gradio.live link")
    app.set_defaults(func=run_app)

    space = subcommands.add_parser("export-space", help="write a folder that runs the demo as a Hugging Face Space",
                                   formatter_class=defaults)
    space.add_argument("--out", required=True, help="the Space folder to write (new or empty)")
    space.add_argument("--model", default=None, help=f"pipeline folder; None = the shipped {DEFAULT_MODEL_NAME}")
    space.add_argument("--title", default="CG-MLLM", help="title of the Space")
    space.set_defaults(func=run_export_space)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as error:
        print(f"cgmllm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Outputs are written last and atomically: an interrupted command leaves no partial file behind.
        writes = args.command in ("generate", "render")
        print(f"\ncgmllm {args.command}: interrupted{'; nothing written' if writes else ''}.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
