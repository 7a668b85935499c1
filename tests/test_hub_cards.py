"""Publishing: every code block of every model card runs, `save_pretrained(push_to_hub=True)` uploads a complete
folder, and a card's licence follows the weights its folder carries.

The Hub cannot be reached here, so its network calls, and only those, are mocked: `HfApi.create_repo` /
`HfApi.upload_folder` (which record what would be sent) and `huggingface_hub.snapshot_download` (which "downloads" a
folder saved by the test). Everything else (saving, loading, generation, captioning, rendering) really runs.
"""

import json
import re
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from cgmllm import CGMLLMPipeline
from cgmllm.modeling_shape_vae import HUNYUAN3D_RELEASE, ShapeVAE
from cgmllm.training.hub import DEFAULT_USAGE, render_model_card


ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "tiny-world"
REPO_ID = "someone/cgmllm-tiny"


def code_blocks(markdown: str) -> list[tuple[str, str]]:
    """`(language, code)` of every fenced block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", markdown, flags=re.S | re.M)


def run_python_blocks(markdown: str, workdir: Path, monkeypatch) -> int:
    """Run every ```python block in `workdir` (in order, one namespace, as a reader would); other blocks must be
    citations. Returns the number of Python blocks run."""
    blocks = code_blocks(markdown)
    assert blocks, "the card has no code block"
    assert {language for language, _ in blocks} <= {"python", "bibtex"}, [language for language, _ in blocks]
    monkeypatch.chdir(workdir)
    namespace = {"__name__": "__card__"}
    python = [code for language, code in blocks if language == "python"]
    for code in python:
        exec(compile(code, "<model card>", "exec"), namespace)  # noqa: S102 (the card's own code, under test)
    return len(python)


@pytest.fixture(scope="module")
def tiny_world():
    pipe = CGMLLMPipeline.from_pretrained(SHIPPED)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_card_code_runs(tmp_path, monkeypatch):
    assert run_python_blocks((SHIPPED / "README.md").read_text(), tmp_path, monkeypatch) == 1
    for name in ("cylinder.glb", "view.png", "from_view.glb"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_push_to_hub_uploads_after_every_file_is_written(tmp_path, tiny_world):
    uploaded = {}

    def upload_folder(self, repo_id, folder_path, **kwargs):  # mocked network: record the folder as sent
        folder = Path(folder_path)
        uploaded["repo_id"] = repo_id
        uploaded["files"] = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        uploaded["index"] = json.loads((folder / "model_index.json").read_text())
        uploaded["card"] = (folder / "README.md").read_text()
        return "https://huggingface.co/someone/cgmllm-tiny/commit/1"

    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id=REPO_ID)) as create, \
            mock.patch("huggingface_hub.HfApi.upload_folder", upload_folder):
        tiny_world.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id=REPO_ID, private=True)
    assert create.call_args.kwargs["private"] is True
    assert uploaded["repo_id"] == REPO_ID
    assert {"pipeline_cgmllm.py", "model_index.json", "README.md", "vae/shape_vae_remote.py",
            "vae/modeling_shape_vae.py", "model/modeling_cgmllm.py", "model/config.json",
            "processor/processing_cgmllm.py"} <= uploaded["files"]
    assert uploaded["index"]["_class_name"] == ["pipeline_cgmllm", "CGMLLMPipeline"]
    assert uploaded["index"]["model"] == ["modeling_cgmllm", "CGMLLMForConditionalGeneration"]
    # The tiny world's VAE was trained by this package: Apache-2.0, no Hunyuan3D licence.
    metadata = ModelCard(uploaded["card"]).data.to_dict()
    assert metadata["license"] == "apache-2.0" and "license_name" not in metadata


def test_template_card_code_runs_on_a_saved_tiny_pipeline(tmp_path, monkeypatch, tiny_world):
    saved = tmp_path / "saved"
    tiny_world.save_pretrained(saved)
    card = render_model_card(REPO_ID, folder=saved)
    assert DEFAULT_USAGE.format(repo_id=REPO_ID) in str(card)
    downloads = []

    def snapshot_download(repo_id, **kwargs):  # mocked network: the repo is the folder saved above
        downloads.append(repo_id)
        return str(saved)

    workdir = tmp_path / "work"
    workdir.mkdir()
    with mock.patch("huggingface_hub.snapshot_download", snapshot_download):
        assert run_python_blocks(str(card), workdir, monkeypatch) == 1
    assert downloads == [REPO_ID, REPO_ID][:len(downloads)] and downloads
    for name in ("car.glb", "car.png", "car_from_image.glb"):
        assert (workdir / name).stat().st_size > 0, name


def test_hub_repo_id_loads_with_the_installed_classes(tmp_path, tiny_world):
    tiny_world.save_pretrained(tmp_path / "saved")
    with mock.patch("huggingface_hub.snapshot_download", return_value=str(tmp_path / "saved")) as download:
        pipe = CGMLLMPipeline.from_pretrained(REPO_ID, revision="main")  # no trust_remote_code needed
    assert download.call_args.args == (REPO_ID,) and download.call_args.kwargs == {"revision": "main"}
    assert type(pipe.model).__module__.startswith("cgmllm.")
    torch.testing.assert_close(pipe.model.llm2obj.weight, tiny_world.model.llm2obj.weight, rtol=0, atol=0)


def _hunyuan_like_vae(tmp_path) -> ShapeVAE:
    """A ShapeVAE loaded the way real Hunyuan3D-2.1 weights are (`from_hunyuan3d`), from a tiny official-layout
    checkpoint."""
    torch.manual_seed(0)
    tiny = ShapeVAE(num_latents=8, embed_dim=8, width=32, heads=4, num_encoder_layers=1, num_decoder_layers=1,
                    num_freqs=4, pc_size=256, pc_sharpedge_size=0, downsample_ratio=4)
    torch.save(tiny.state_dict(), tmp_path / "model.fp16.ckpt")
    with open(tmp_path / "config.yaml", "w") as handle:
        yaml.safe_dump({"params": {"num_latents": 8, "heads": 4, "pc_size": 256, "pc_sharpedge_size": 0,
                                   "downsample_ratio": 4}}, handle)
    return ShapeVAE.from_hunyuan3d(tmp_path)


def test_hunyuan3d_vae_folders_carry_its_licence(tmp_path, tiny_world):
    vae = _hunyuan_like_vae(tmp_path)
    assert vae.config.weights_source == HUNYUAN3D_RELEASE
    pipe = CGMLLMPipeline(model=tiny_world.model, vae=vae, scheduler=tiny_world.scheduler,
                          processor=tiny_world.processor)
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = CGMLLMPipeline.from_pretrained(tmp_path / "saved")
    assert reloaded.vae.config.weights_source == HUNYUAN3D_RELEASE  # survives save / load

    card = render_model_card(REPO_ID, folder=tmp_path / "saved")
    metadata = card.data.to_dict()
    assert metadata["license"] == "other" and metadata["license_name"] == "tencent-hunyuan-community"
    assert metadata["license_link"] == "https://huggingface.co/tencent/Hunyuan3D-2.1/blob/main/LICENSE"
    assert metadata["base_model"] == ["Qwen/Qwen3-VL-2B-Instruct", "tencent/Hunyuan3D-2.1"]
    assert "## License" in str(card) and "Tencent Hunyuan 3D 2.1 Community License" in str(card)

    with pytest.raises(ValueError, match="licence is not known"):
        render_model_card(REPO_ID, weights_sources=["someone/other-vae"])
