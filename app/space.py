"""A ready Hugging Face Space folder for the demo: `cgmllm export-space [--model DIR] --out SPACE_DIR`.

The folder runs as it is on Spaces (`sdk: gradio`) or locally with `python app.py`:

    SPACE_DIR/
      README.md          Space metadata (sdk, sdk_version, app_file, licence of the pipeline)
      app.py             loads ./pipeline and serves `cgmllm.app.build_app`
      requirements.txt   the package's runtime dependencies and gradio
      pipeline/          the pipeline folder (weights + remote code)
      examples/          rendered example views for the image tab
      cgmllm/            the package's runtime code (model, pipeline, app), copied from the installed package:
                         cg-mllm is not on PyPI, so the Space carries the code it imports
"""

import os
import re
import shutil
from importlib import metadata
from pathlib import Path


APP_PY = '''"""CG-MLLM demo (written by `cgmllm export-space`). Locally: `pip install -r requirements.txt && python app.py`."""

from pathlib import Path

from cgmllm import CGMLLMPipeline
from cgmllm.app import build_app


HERE = Path(__file__).resolve().parent
pipe = CGMLLMPipeline.from_pretrained(HERE / "pipeline")
app = build_app(pipe, example_images=sorted(str(path) for path in (HERE / "examples").glob("*.png")))

if __name__ == "__main__":
    app.queue(default_concurrency_limit=1).launch()
'''

SPACE_README = """---
title: {title}
emoji: 🧊
colorFrom: blue
colorTo: gray
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
{license_line}---

# {title}

Text -> 3D, image -> 3D and 3D / image captioning with CG-MLLM ([arXiv 2601.21798](https://arxiv.org/abs/2601.21798)),
served by `cgmllm.app`. The pipeline is in `pipeline/` (see its model card there).
"""

# Runtime code of the app: the import package's own modules and the two subpackages it needs (training,
# evaluation and the shipped checkpoints are left out).
_RUNTIME_SUBPACKAGES = ("pipelines", "app")


def _package_root(module) -> Path:
    return Path(module.__file__).resolve().parent


def _copy_python_files(source: Path, target: Path):
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.py")):
        shutil.copyfile(path, target / path.name)


def _runtime_requirements() -> list[str]:
    """The installed distribution's dependencies without extras, plus gradio (this app's extra)."""
    import gradio

    try:
        requirements = metadata.requires("cg-mllm") or []
    except metadata.PackageNotFoundError:
        requirements = []
    runtime = [requirement for requirement in requirements if "extra ==" not in requirement]
    return runtime + [f"gradio>={gradio.__version__}"]


def _pipeline_license_lines(pipeline_dir: Path) -> str:
    """The `license`, `license_name` and `license_link` lines of the pipeline card's metadata, as they are."""
    card = pipeline_dir / "README.md"
    match = re.search(r"^---\n(.*?)\n---", card.read_text(), flags=re.S) if card.is_file() else None
    if not match:
        return ""
    lines = re.findall(r"^license(?:_name|_link)?:.*$", match.group(1), flags=re.M)
    return "".join(line + "\n" for line in lines)


def export_space(pipeline_dir: str | os.PathLike, out: str | os.PathLike, title: str = "CG-MLLM") -> Path:
    """Write a Space folder that serves the pipeline saved in `pipeline_dir`.

    Args:
        pipeline_dir: a folder written by `CGMLLMPipeline.save_pretrained` (with `model_index.json`).
        out: the Space folder to write; it must not exist or be empty (nothing is overwritten).
        title: the Space's title.

    Returns:
        `out` as a `Path`.
    """
    import gradio

    import cgmllm

    from .demo import example_views

    pipeline_dir, out = Path(pipeline_dir), Path(out)
    if not (pipeline_dir / "model_index.json").is_file():
        raise ValueError(f"{pipeline_dir} is not a pipeline folder (no model_index.json); save one with "
                         "CGMLLMPipeline.save_pretrained.")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; give a new folder for the Space.")
    out.mkdir(parents=True, exist_ok=True)

    shutil.copytree(pipeline_dir, out / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    package = _package_root(cgmllm)
    _copy_python_files(package, out / "cgmllm")
    for name in _RUNTIME_SUBPACKAGES:
        module = __import__(f"cgmllm.{name}", fromlist=["__file__"])
        _copy_python_files(_package_root(module), out / "cgmllm" / name)
    example_views(out / "examples")
    (out / "app.py").write_text(APP_PY)
    (out / "requirements.txt").write_text("\n".join(_runtime_requirements()) + "\n")
    (out / "README.md").write_text(SPACE_README.format(
        title=title, gradio_version=gradio.__version__, license_line=_pipeline_license_lines(pipeline_dir)))
    return out


__all__ = ["export_space"]
