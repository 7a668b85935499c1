"""Model cards and Hub upload for CG-MLLM pipeline folders.

`render_model_card` fills `hub_cards/model_card.md` (YAML metadata via `huggingface_hub.ModelCardData`) and
`push_to_hub` writes the card into the folder and uploads it with `huggingface_hub.HfApi` (create_repo +
upload_folder): nothing else happens over the network.
"""

from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData


TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "hub_cards" / "model_card.md"
PIPELINE_TAGS = ("text-to-3d", "image-to-3d")

DEFAULT_USAGE = """```python
import torch
from cgmllm.pipelines import CGMLLMPipeline

pipe = CGMLLMPipeline.from_pretrained("{repo_id}")   # without the package: DiffusionPipeline + trust_remote_code=True
pipe.to("cuda", torch.bfloat16)

# text -> 3D and image -> 3D
pipe("a red sports car", num_inference_steps=49, guidance_scale=7.5,
     generator=torch.Generator().manual_seed(42)).mesh.export("car.glb")
pipe(image="car.png").mesh.export("car_from_image.glb")

# 3D -> text and image -> text
print(pipe.caption(mesh="car.glb"))
print(pipe.caption(image="car.png"))
```"""

DEFAULT_TRAINING = """Trained with `cgmllm-train` (`transformers.Trainer`): stage 1 alignment at 512 latent tokens with 90% condition
dropout, stage 2 progressive resolution 512 → 1024 → 2048 → 4096 with dropout 90% → 10% and learning rate
1e-4 → 5e-5. The ShapeVAE is frozen throughout."""


def model_card_data(base_model: str | None = "Qwen/Qwen3-VL-2B-Instruct", pipeline_tag: str = "text-to-3d",
                    license: str = "apache-2.0", datasets=None, tags=None) -> ModelCardData:
    if pipeline_tag not in PIPELINE_TAGS:
        raise ValueError(f"pipeline_tag must be one of {PIPELINE_TAGS}, got {pipeline_tag!r}.")
    base_tags = ["cg-mllm", "text-to-3d", "image-to-3d", "image-to-text", "3d-captioning", "mesh", "flow-matching",
                 "mixture-of-transformers"]
    return ModelCardData(
        library_name="diffusers",
        pipeline_tag=pipeline_tag,
        base_model=base_model,
        license=license,
        datasets=list(datasets or []),
        tags=base_tags + [t for t in (tags or []) if t not in base_tags],
    )


def render_model_card(repo_id: str, model_name: str | None = None, model_description: str = "",
                      training_summary: str = "", usage: str = "", evaluation: str = "", template_path=None,
                      **card_data_kwargs) -> ModelCard:
    """A `ModelCard` from the template; `card_data_kwargs` go to [`model_card_data`].

    `usage` (Markdown, default: text/image -> 3D and captioning on a GPU), `training_summary` (default: the
    paper's stage schedule) and `evaluation` (a section only when given) fill the card's sections."""
    template = Path(template_path or TEMPLATE_PATH)
    if not template.is_file():
        raise ValueError(f"Model card template {template} not found.")
    return ModelCard.from_template(
        model_card_data(**card_data_kwargs),
        template_path=str(template),
        repo_id=repo_id,
        model_name=model_name or repo_id.split("/")[-1],
        model_description=model_description or "A CG-MLLM pipeline (text/image -> 3D mesh, 3D/image -> text).",
        training_summary=training_summary or DEFAULT_TRAINING,
        usage=usage or DEFAULT_USAGE.format(repo_id=repo_id),
        evaluation=evaluation,
    )


def push_to_hub(folder, repo_id: str, card: ModelCard | None = None, private: bool = False, token=None,
                commit_message: str = "Upload CG-MLLM pipeline", **card_kwargs) -> str:
    """Write `README.md` into a saved pipeline folder and upload the folder; returns the commit URL."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file() and not (folder / "model").is_dir():
        raise ValueError(f"{folder} is not a saved CG-MLLM pipeline folder (no model_index.json or model/).")
    card = card or render_model_card(repo_id, **card_kwargs)
    card.save(folder / "README.md")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)


__all__ = ["PIPELINE_TAGS", "model_card_data", "push_to_hub", "render_model_card"]
