"""Model cards and Hub upload for CG-MLLM pipeline folders.

`render_model_card` fills `hub_cards/model_card.md` (YAML metadata via `huggingface_hub.ModelCardData`) and
`push_to_hub` writes the card into the folder and uploads it with `huggingface_hub.HfApi` (create_repo +
upload_folder): nothing else happens over the network.
"""

from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData


TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "hub_cards" / "model_card.md"
PIPELINE_TAGS = ("text-to-3d", "image-to-3d")


def model_card_data(base_model: str = "Qwen/Qwen3-VL-2B-Instruct", pipeline_tag: str = "text-to-3d",
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
                      training_summary: str = "", template_path=None, **card_data_kwargs) -> ModelCard:
    """A `ModelCard` from the template; `card_data_kwargs` go to [`model_card_data`]."""
    template = Path(template_path or TEMPLATE_PATH)
    if not template.is_file():
        raise ValueError(f"Model card template {template} not found.")
    return ModelCard.from_template(
        model_card_data(**card_data_kwargs),
        template_path=str(template),
        repo_id=repo_id,
        model_name=model_name or repo_id.split("/")[-1],
        model_description=model_description or "A CG-MLLM pipeline (text/image -> 3D mesh, 3D/image -> text).",
        training_summary=training_summary or "See the training configuration in this repository.",
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
