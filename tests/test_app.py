"""The web demo (`cgmllm.app`) on the shipped tiny-world checkpoint: its functions called directly, the app served
on 127.0.0.1 and driven through `gradio_client`, and one end-to-end check in headless Chromium.

    CGMLLM_APP_SCREENSHOT=docs/images/app.png python -m pytest tests/test_app.py -k browser   # the README picture
"""

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

gradio = pytest.importorskip("gradio", reason='the web demo needs gradio (pip install -e ".[app]")')

from cgmllm.app import CGMLLMDemo, build_app, export_space  # noqa: E402
from cgmllm.cli import default_model_dir, main  # noqa: E402

QUICK = {"steps": 4, "octree_resolution": 32}


@pytest.fixture(scope="module")
def pipe():
    from cgmllm import CGMLLMPipeline

    pipe = CGMLLMPipeline.from_pretrained(default_model_dir())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def demo(pipe, tmp_path):
    return CGMLLMDemo(pipe, output_dir=tmp_path / "results")


def test_text_to_3d_writes_every_format_and_a_preview(demo):
    progress = []
    glb, preview, files, status = demo.text_to_3d(
        "a tall cylinder", seed=0, steps=4, octree_resolution=32,
        progress=lambda value, desc=None, unit=None: progress.append(value))
    assert [Path(path).suffix for path in files] == [".glb", ".obj", ".ply", ".stl"] and files[0] == glb
    for path in files:
        mesh = trimesh.load(path, force="mesh")
        assert len(mesh.faces) > 0, path
    assert preview.size == (384, 384)  # 2 x 2 views of 192 pixels
    assert "faces" in status and "4 steps" in status
    assert progress[:4] == [(1, 4), (2, 4), (3, 4), (4, 4)]  # the pipeline's step callback feeds the progress bar


def test_image_to_3d_and_both_captions(demo, tmp_path):
    from cgmllm.app import example_views

    view = example_views(tmp_path / "views")[0]
    glb, _, files, status = demo.image_to_3d(view, **QUICK)
    assert glb is not None, status
    caption, status = demo.caption_mesh(glb)
    assert isinstance(caption, str) and caption.strip(), status
    caption, status = demo.caption_image(view)
    assert "torus" in caption, caption  # the shipped checkpoint names the family of its own data set's view


def test_old_results_are_removed(pipe, tmp_path):
    demo = CGMLLMDemo(pipe, output_dir=tmp_path / "results", keep_results=1)
    first = demo.text_to_3d("a flat box", **QUICK)[0]
    second = demo.text_to_3d("a flat box", seed=1, **QUICK)[0]
    assert not Path(first).exists() and Path(second).exists()
    owned = CGMLLMDemo(pipe)
    owned.text_to_3d("a flat box", **QUICK)
    owned.close()
    assert not owned.output_dir.exists()


def test_bad_inputs_return_the_command_lines_messages(demo, tmp_path, capsys):
    corrupt = tmp_path / "broken.glb"
    corrupt.write_bytes(b"not a mesh at all")
    caption, status = demo.caption_mesh(str(corrupt))
    assert caption is None and status.startswith("**Error:**")
    assert main(["caption", str(corrupt)]) == 2
    cli_message = capsys.readouterr().err.split("error: ", 1)[1].strip()
    assert cli_message in status  # the same words as `cgmllm caption`

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert "unsupported extension" in demo.caption_mesh(str(text))[1]
    fake_image = tmp_path / "photo.png"
    fake_image.write_text("not an image")
    assert "not a readable image" in demo.caption_image(str(fake_image))[1]
    assert "not a readable image" in demo.image_to_3d(str(fake_image))[3]
    assert demo.text_to_3d("   ")[3] == "**Error:** the prompt is empty."
    assert "between 1 and 64" in demo.text_to_3d("a cube", num_shape_tokens=1000)[3]
    assert "at least 1" in demo.text_to_3d("a cube", steps=0)[3]
    assert demo.caption_mesh(None)[1] == "**Error:** no mesh uploaded."
    with pytest.raises(ValueError, match="Unknown settings"):
        build_app(demo.pipe, demo=demo, example_images=[], settings={"stepz": 4})


@pytest.fixture(scope="module")
def served(pipe, tmp_path_factory):
    """The app on 127.0.0.1, as `cgmllm app` serves it: a queue of one request at a time. Gradio picks the port itself
    (the first free one from 7860 on, bound by its own server), so no other process can take it between a probe and
    the launch."""
    demo = CGMLLMDemo(pipe, output_dir=tmp_path_factory.mktemp("served"))
    app = build_app(pipe, demo=demo, settings=QUICK)
    app.queue(default_concurrency_limit=1).launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True,
                                                  quiet=True)
    yield f"http://127.0.0.1:{app.server_port}/"
    app.close()
    demo.close()


def test_app_through_gradio_client(served, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(served, verbose=False, download_files=str(tmp_path))
    glb, _, files, status = client.predict("a sphere on top of a box", 0, 4, 4.0, 64, 32, api_name="/text_to_3d")
    assert "faces" in status
    assert len(trimesh.load(glb, force="mesh").faces) > 0
    assert sorted(Path(entry).suffix for entry in files) == [".glb", ".obj", ".ply", ".stl"]
    caption, status = client.predict(handle_file(glb), api_name="/caption_mesh")
    assert caption and caption.strip(), status
    broken = tmp_path / "broken.obj"
    broken.write_text("v 0 0 0\n")  # one vertex, no faces
    caption, status = client.predict(handle_file(str(broken)), api_name="/caption_mesh")
    assert caption is None and status.startswith("**Error:**")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_browser_generates_and_shows_a_model(served, tmp_path):
    """Open the page in headless Chromium, type a prompt, press Generate, wait for the 3D viewer to show the model."""
    playwright = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (dev extra)")
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium package; apt-get failed here)")
    screenshot = Path(os.environ.get("CGMLLM_APP_SCREENSHOT", tmp_path / "app.png"))
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--use-gl=swiftshader"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(served, wait_until="networkidle")
            page.locator("#prompt textarea").fill("a tall cylinder")
            page.locator("#generate-text").click()
            page.wait_for_function(
                "() => (document.querySelector('#generation-status') || {}).innerText?.includes('faces')",
                timeout=120_000,
            )
            viewer = page.locator("#result-viewer canvas").first
            viewer.wait_for(state="visible", timeout=60_000)
            drawn = 0.0
            for _ in range(60):  # the viewer loads the GLB and draws it a moment after the status arrives
                pixels = np.asarray(Image.open(io.BytesIO(viewer.screenshot())).convert("L"), dtype=np.float32)
                drawn = float((np.abs(pixels - np.median(pixels)) > 25).mean())
                if drawn > 0.02:
                    break
                page.wait_for_timeout(500)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert drawn > 0.02, f"the 3D viewer shows nothing but its background ({drawn:.1%} of its pixels differ)"
    assert screenshot.stat().st_size > 10_000


def test_export_space_runs_as_a_space(tmp_path):
    space = export_space(default_model_dir(), tmp_path / "space")
    for name in ("app.py", "requirements.txt", "README.md", "pipeline/model_index.json", "cgmllm/__init__.py",
                 "cgmllm/pipelines/pipeline_cgmllm.py", "cgmllm/app/demo.py"):
        assert (space / name).is_file(), name
    assert "sdk: gradio" in (space / "README.md").read_text()
    assert "gradio>=" in (space / "requirements.txt").read_text()
    assert sorted(path.name for path in (space / "examples").glob("*.png"))
    with pytest.raises(ValueError, match="not empty"):
        export_space(default_model_dir(), space)
    # The Space's own code is what runs there: import app.py from the folder (not launched: not __main__).
    check = (
        "import app, cgmllm, pathlib; "
        "assert pathlib.Path(cgmllm.__file__).resolve().is_relative_to(pathlib.Path.cwd().resolve()), cgmllm.__file__; "
        "print(app.app.cgmllm_demo.text_to_3d('a tall cylinder', steps=2, octree_resolution=16)[3])"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=space, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "faces" in result.stdout
