"""`cgmllm.app`: the web demo (gradio; `pip install "cg-mllm[app]"`).

    cgmllm app [--model PIPELINE_DIR] [--port 7860] [--share]
    cgmllm export-space [--model PIPELINE_DIR] --out SPACE_DIR     # a folder that runs as a Hugging Face Space

`build_app(pipe)` returns the `gradio.Blocks`; `CGMLLMDemo` holds what its buttons do; `export_space` writes the Space.
"""

from .demo import EXAMPLE_PROMPTS, CGMLLMDemo, build_app, example_views, launch_app
from .space import export_space


__all__ = ["CGMLLMDemo", "EXAMPLE_PROMPTS", "build_app", "example_views", "export_space", "launch_app"]
