"""The CG-MLLM web demo: a gradio app over a `CGMLLMPipeline`.

    cgmllm app [--model PIPELINE_DIR] [--port 7860] [--share]      # the shipped tiny-world checkpoint by default

Tabs: text -> 3D, image -> 3D (a `gr.Model3D` viewer, GLB / OBJ / PLY / STL downloads and a multi-view preview),
and captioning (a mesh upload or an image). The work is done by `CGMLLMDemo`, whose methods are plain functions of
their inputs (tests call them directly); `build_app` only lays them out. Every method returns a status message
instead of raising, so a bad upload shows the same error as the command line, never a traceback.
"""

import logging
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


logger = logging.getLogger(__name__)

MESH_FORMATS = ("glb", "obj", "ply", "stl")
"""Files written for every generated mesh; the viewer shows the GLB."""

MESH_UPLOAD_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")

EXAMPLE_PROMPTS = (
    "a tall cylinder",
    "a sphere on top of a box",
    "a thick torus standing on its edge",
    "a cone upside down",
    "a long capsule lying on its side",
    "a flat box",
)
"""Prompts the README shows, which the shipped tiny-world checkpoint was trained to understand."""

EXAMPLE_VIEWS = (
    ("torus", {"thickness": "thick", "orientation": "lying"}),
    ("tube", {"proportion": "tall", "thickness": "thick", "orientation": "tilted"}),
    ("cone", {"proportion": "regular", "orientation": "upside_down"}),
)
"""Tiny-world shapes (family, attributes) rendered as the data set renders its views: the image examples."""


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "mesh"


def _error(message: str) -> str:
    return f"**Error:** {message}"


class CGMLLMDemo:
    """What the app does, one method per button.

    Args:
        pipe: the `CGMLLMPipeline` to run (its progress bar is left as configured; the app shows its own).
        output_dir: where result files go; a fresh temporary folder (removed by `close`) when None.
        keep_results: result folders kept on disk; older ones are deleted as new ones are written (gradio serves
            its own copies, so the viewer keeps working).
    """

    def __init__(self, pipe, output_dir: str | Path | None = None, keep_results: int = 8):
        self.pipe = pipe
        self._owns_output_dir = output_dir is None
        self.output_dir = Path(tempfile.mkdtemp(prefix="cgmllm-app-") if output_dir is None else output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.keep_results = keep_results
        self._counter = 0

    @property
    def max_shape_tokens(self) -> int:
        return int(self.pipe.model.config.num_shape_tokens)

    def close(self):
        """Remove the temporary output folder (when the demo made it)."""
        if self._owns_output_dir:
            shutil.rmtree(self.output_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------------------------

    def text_to_3d(self, prompt, seed=0, steps=25, guidance_scale=4.0, num_shape_tokens=None, octree_resolution=128,
                   progress=None):
        """Text -> mesh. Returns `(glb_path, preview_image, [glb, obj, ply, stl], status)`; the first three are None
        when the status is an error."""
        if prompt is None or not str(prompt).strip():
            return None, None, None, _error("the prompt is empty.")
        return self._generate({"prompt": str(prompt)}, _slug(prompt), seed, steps, guidance_scale, num_shape_tokens,
                              octree_resolution, progress)

    def image_to_3d(self, image, seed=0, steps=25, guidance_scale=4.0, num_shape_tokens=None, octree_resolution=128,
                    progress=None):
        """Image -> mesh, as `text_to_3d`; `image` is a PIL image or an image file path."""
        if image is None:
            return None, None, None, _error("no image given.")
        loaded, message = self._read_image(image)
        if message:
            return None, None, None, _error(message)
        return self._generate({"image": loaded}, "from_image", seed, steps, guidance_scale, num_shape_tokens,
                              octree_resolution, progress)

    def _check_settings(self, seed, steps, guidance_scale, num_shape_tokens, octree_resolution) -> str | None:
        if steps is None or int(steps) < 1:
            return f"steps must be at least 1, got {steps}."
        if octree_resolution is None or int(octree_resolution) < 4:
            return f"the octree resolution must be at least 4, got {octree_resolution}."
        if num_shape_tokens is not None and not 1 <= int(num_shape_tokens) <= self.max_shape_tokens:
            return (f"the number of latent tokens must be between 1 and {self.max_shape_tokens} (this model's "
                    f"num_shape_tokens), got {num_shape_tokens}.")
        if seed is None or int(seed) < 0:
            return f"the seed must be a non-negative integer, got {seed}."
        if guidance_scale is None:
            return "the guidance scale is missing."
        return None

    def _generate(self, condition, name, seed, steps, guidance_scale, num_shape_tokens, octree_resolution, progress):
        import torch

        from ..rendering import DEFAULT_COLOR, render_multiview

        problem = self._check_settings(seed, steps, guidance_scale, num_shape_tokens, octree_resolution)
        if problem:
            return None, None, None, _error(problem)
        steps = int(steps)

        def on_step_end(pipe, step, timestep, callback_kwargs):
            if progress is not None:
                progress((step + 1, steps), desc="denoising", unit="steps")
            return callback_kwargs

        start = time.perf_counter()
        try:
            output = self.pipe(
                **condition,
                num_inference_steps=steps,
                guidance_scale=float(guidance_scale),
                num_shape_tokens=None if num_shape_tokens is None else int(num_shape_tokens),
                octree_resolution=int(octree_resolution),
                generator=torch.Generator().manual_seed(int(seed)),
                callback_on_step_end=on_step_end,
            )
        except ValueError as error:  # the pipeline's own input checks
            return None, None, None, _error(str(error))
        except Exception as error:  # never a traceback in the page; the log keeps it
            logger.exception("generation failed")
            return None, None, None, _error(f"generation failed ({type(error).__name__}: {error}).")
        mesh = output.meshes[0]
        if mesh is None or len(mesh.faces) == 0:
            return None, None, None, _error(
                "the decoded field never crosses the surface level: no surface. Try another seed or more steps.")
        if progress is not None:
            progress(None, desc="writing files")
        folder = self._new_result_folder()
        mesh = mesh.copy()
        mesh.visual.face_colors = [*DEFAULT_COLOR, 255]  # the preview's colour; viewers draw an uncoloured mesh pale
        paths = []
        for file_type in MESH_FORMATS:
            path = folder / f"{name}_seed{int(seed)}.{file_type}"
            mesh.export(path, file_type=file_type)
            paths.append(str(path))
        preview = render_multiview(mesh, image_size=192, num_views=4, columns=2)
        status = (f"{len(mesh.vertices)} vertices, {len(mesh.faces)} faces in {time.perf_counter() - start:.1f} s "
                  f"({steps} steps, guidance {float(guidance_scale):g}, seed {int(seed)}, octree "
                  f"{int(octree_resolution)}).")
        return paths[0], preview, paths, status

    def _new_result_folder(self) -> Path:
        self._counter += 1
        folder = self.output_dir / f"result_{self._counter:05d}"
        folder.mkdir(parents=True)
        results = sorted(path for path in self.output_dir.glob("result_*") if path.is_dir())
        for old in results[: max(0, len(results) - self.keep_results)]:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    # ------------------------------------------------------------------------------------------------------------
    # Captioning
    # ------------------------------------------------------------------------------------------------------------

    def caption_mesh(self, mesh_file) -> tuple[str | None, str]:
        """Mesh file (path, or gradio's upload object with a `.name`) -> `(caption, status)`."""
        from ..mesh_utils import load_mesh

        if mesh_file is None:
            return None, _error("no mesh uploaded.")
        path = Path(getattr(mesh_file, "name", mesh_file))
        if path.suffix.lower() not in MESH_UPLOAD_SUFFIXES:
            return None, _error(f"mesh {path.name}: unsupported extension, use one of "
                                f"{', '.join(MESH_UPLOAD_SUFFIXES)}.")
        try:
            mesh = load_mesh(path)
        except ValueError as error:  # the loader names what is wrong with the file, as in `cgmllm caption`
            return None, _error(str(error))
        return self._caption(mesh=mesh)

    def caption_image(self, image) -> tuple[str | None, str]:
        """Image (PIL or path) -> `(caption, status)`."""
        if image is None:
            return None, _error("no image given.")
        loaded, message = self._read_image(image)
        if message:
            return None, _error(message)
        return self._caption(image=loaded)

    def _caption(self, **inputs) -> tuple[str | None, str]:
        start = time.perf_counter()
        try:
            caption = self.pipe.caption(**inputs)[0]
        except ValueError as error:
            return None, _error(str(error))
        except Exception as error:
            logger.exception("captioning failed")
            return None, _error(f"captioning failed ({type(error).__name__}: {error}).")
        return caption, f"captioned in {time.perf_counter() - start:.1f} s."

    @staticmethod
    def _read_image(image):
        """A PIL image as given, or the file read as `cgmllm caption` / `generate --image` read it: `(image, None)`, or
        `(None, the command line's message)`."""
        from PIL import Image

        from ..cli import CLIError, read_image

        if isinstance(image, Image.Image):
            return image, None
        try:
            return read_image(getattr(image, "name", image), "image"), None
        except CLIError as error:
            return None, str(error)


def example_views(folder: str | Path, image_size: int = 128) -> list[str]:
    """Render `EXAMPLE_VIEWS` (tiny-world shapes, from the data set's camera) into `folder`; returns the paths."""
    from ..rendering import render_mesh
    from ..training.tiny_world import DATASET_VIEW, ShapeSpec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for family, attributes in EXAMPLE_VIEWS:
        spec = ShapeSpec(family, attributes)
        path = folder / f"view_{_slug(spec.caption())}.png"
        if not path.is_file():
            render_mesh(spec.to_mesh(), image_size, **DATASET_VIEW).save(path)
        paths.append(str(path))
    return paths


DEFAULT_SETTINGS = {"seed": 0, "steps": 25, "guidance_scale": 4.0, "octree_resolution": 128}
"""Initial values of the advanced settings: the tiny-world evaluation's sampling settings (25 Euler steps, CFG 4)
and the command line's octree resolution."""


def build_app(pipe, demo: CGMLLMDemo | None = None, example_prompts: Sequence[str] = EXAMPLE_PROMPTS,
              example_images: Sequence[str] | None = None, title: str = "CG-MLLM", settings: dict | None = None):
    """The gradio `Blocks` app over `pipe` (launch it with `launch_app`, or `.queue().launch()` yourself).

    Args:
        pipe: a `CGMLLMPipeline`.
        demo: the `CGMLLMDemo` doing the work (one over `pipe` by default); `app.cgmllm_demo` holds it.
        example_prompts / example_images: examples under the text and image inputs; the images default to
            tiny-world views rendered into the demo's output folder (`example_views`).
        title: page title.
        settings: initial values overriding `DEFAULT_SETTINGS` (e.g. `{"steps": 4}` for a quick check).
    """
    import gradio as gr

    demo = demo or CGMLLMDemo(pipe)
    if example_images is None:
        example_images = example_views(demo.output_dir / "examples")
    max_tokens = demo.max_shape_tokens
    unknown = set(settings or {}) - set(DEFAULT_SETTINGS)
    if unknown:
        raise ValueError(f"Unknown settings {sorted(unknown)}; expected some of {sorted(DEFAULT_SETTINGS)}.")
    initial = {**DEFAULT_SETTINGS, **(settings or {})}

    def generation_settings():
        with gr.Accordion("Advanced settings", open=False):
            seed = gr.Number(value=initial["seed"], precision=0, minimum=0, label="Seed")
            steps = gr.Slider(1, 100, value=initial["steps"], step=1, label="Denoising steps")
            guidance = gr.Slider(0.0, 15.0, value=initial["guidance_scale"], step=0.5,
                                 label="Guidance scale (<= 1: off)")
            tokens = gr.Slider(1, max_tokens, value=max_tokens, step=1, label="Latent tokens per object")
            octree = gr.Slider(16, 256, value=initial["octree_resolution"], step=16,
                               label="Octree resolution (marching-cubes cells per axis)")
        return [seed, steps, guidance, tokens, octree]

    def generation_outputs():
        viewer = gr.Model3D(label="Result", clear_color=(0.95, 0.95, 0.95, 1.0), camera_position=(30, 70, 4.0),
                             height=360, elem_id="result-viewer")
        preview = gr.Image(label="Multi-view preview", type="pil", interactive=False)
        files = gr.File(label="Download (GLB / OBJ / PLY / STL)", file_count="multiple", interactive=False)
        status = gr.Markdown(elem_id="generation-status")
        return [viewer, preview, files, status]

    def text_to_3d(prompt, seed, steps, guidance, tokens, octree, progress=gr.Progress()):
        return demo.text_to_3d(prompt, seed, steps, guidance, tokens, octree, progress=progress)

    def image_to_3d(image, seed, steps, guidance, tokens, octree, progress=gr.Progress()):
        return demo.image_to_3d(image, seed, steps, guidance, tokens, octree, progress=progress)

    with gr.Blocks(title=title, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"# {title}\nOne multimodal LLM that generates 3D meshes from text or images and captions meshes "
                    "and images ([arXiv 2601.21798](https://arxiv.org/abs/2601.21798)).")
        with gr.Tab("Text to 3D"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", placeholder="a tall cylinder", elem_id="prompt")
                    text_button = gr.Button("Generate", variant="primary", elem_id="generate-text")
                    text_settings = generation_settings()
                    gr.Examples([[p] for p in example_prompts], inputs=[prompt])
                with gr.Column():
                    text_outputs = generation_outputs()
            text_button.click(text_to_3d, [prompt, *text_settings], text_outputs, api_name="text_to_3d")
            prompt.submit(text_to_3d, [prompt, *text_settings], text_outputs)
        with gr.Tab("Image to 3D"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(label="Image", type="pil", image_mode=None)
                    image_button = gr.Button("Generate", variant="primary")
                    image_settings = generation_settings()
                    gr.Examples([[path] for path in example_images], inputs=[image])
                with gr.Column():
                    image_outputs = generation_outputs()
            image_button.click(image_to_3d, [image, *image_settings], image_outputs, api_name="image_to_3d")
        with gr.Tab("Captioning"):
            with gr.Row():
                with gr.Column():
                    mesh_file = gr.File(label="Mesh (GLB / OBJ / PLY / STL)", file_types=list(MESH_UPLOAD_SUFFIXES),
                                        type="filepath")
                    mesh_button = gr.Button("Caption the mesh", variant="primary")
                with gr.Column():
                    caption_image = gr.Image(label="or an image", type="pil", image_mode=None)
                    image_caption_button = gr.Button("Caption the image", variant="primary")
            caption = gr.Textbox(label="Caption", interactive=False)
            caption_status = gr.Markdown()
            mesh_button.click(demo.caption_mesh, [mesh_file], [caption, caption_status], api_name="caption_mesh")
            image_caption_button.click(demo.caption_image, [caption_image], [caption, caption_status],
                                       api_name="caption_image")
    app.cgmllm_demo = demo
    return app


def launch_app(pipe, port: int = 7860, share: bool = False, host: str = "127.0.0.1", **launch_kwargs):
    """Build the app and serve it, one request at a time (a CPU runs one generation well, not several)."""
    app = build_app(pipe)
    try:
        return app.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, share=share,
                                                             **launch_kwargs)
    finally:
        if not launch_kwargs.get("prevent_thread_lock"):
            app.cgmllm_demo.close()


__all__ = ["CGMLLMDemo", "DEFAULT_SETTINGS", "EXAMPLE_PROMPTS", "build_app", "example_views", "launch_app"]
