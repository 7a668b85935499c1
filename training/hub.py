"""Model cards and Hub upload for CG-MLLM pipeline folders.

`render_model_card` fills `hub_cards/model_card.md` (YAML metadata via `huggingface_hub.ModelCardData`) and
`push_to_hub` writes the card into the folder and uploads it with `huggingface_hub.HfApi` (create_repo +
upload_folder): nothing else happens over the network.
"""

import json
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData


TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "hub_cards" / "model_card.md"
PIPELINE_TAGS = ("text-to-3d", "image-to-3d")

DEFAULT_USAGE = """```python
import torch
from cgmllm import CGMLLMPipeline, render_mesh

# With the package installed (`pip install cg-mllm`) its classes load the weights: no remote code runs. Without it,
# `DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)` runs the code shipped in this repo.
pipe = CGMLLMPipeline.from_pretrained("{repo_id}")
if torch.cuda.is_available():
    pipe.to("cuda", torch.bfloat16)
    settings = dict(num_inference_steps=49, guidance_scale=7.5, octree_resolution=256)  # the official sampler
else:  # a quicker, coarser preview on a CPU
    settings = dict(num_inference_steps=25, guidance_scale=7.5, octree_resolution=64)

# text -> 3D, then image -> 3D from a picture of the result
out = pipe("a red sports car", generator=torch.Generator().manual_seed(42), **settings)
out.mesh.export("car.glb")
render_mesh(out.mesh).save("car.png")
pipe(image="car.png", generator=torch.Generator().manual_seed(42), **settings).mesh.export("car_from_image.glb")

# 3D -> text and image -> text
print(pipe.caption(mesh="car.glb"))
print(pipe.caption(image="car.png"))
```"""

#: Licence metadata of ShapeVAE weights by the release they come from (`ShapeVAE.config.weights_source`).
WEIGHTS_LICENSES = {
    "tencent/Hunyuan3D-2.1": {
        "license": "other",
        "license_name": "tencent-hunyuan-community",
        "license_link": "https://huggingface.co/tencent/Hunyuan3D-2.1/blob/main/LICENSE",
        "extra_gated_eu_disallowed": True,  # the licence does not apply in the EU, the UK and South Korea
        "note": "The ShapeVAE weights in `vae/` are Tencent's Hunyuan3D-2.1 VAE, released under the [Tencent Hunyuan "
                "3D 2.1 Community License](https://huggingface.co/tencent/Hunyuan3D-2.1/blob/main/LICENSE), which "
                "this folder inherits: it does not apply in the European Union, the United Kingdom and South Korea, "
                "and services above 1 million monthly active users need a licence from Tencent. The CG-MLLM weights "
                "derive from Qwen3-VL (Apache-2.0).",
    },
}

DEFAULT_TRAINING = """Trained with `cgmllm-train` (`transformers.Trainer`): stage 1 alignment at 512 latent tokens with 90% condition
dropout, stage 2 progressive resolution 512 → 1024 → 2048 → 4096 with dropout 90% → 10% and learning rate
1e-4 → 5e-5. The ShapeVAE is frozen throughout."""


def folder_weights_sources(folder) -> list[str]:
    """Releases whose weights a saved pipeline folder carries (`weights_source` of `vae/config.json`)."""
    config_path = Path(folder) / "vae" / "config.json"
    if not config_path.is_file():
        return []
    source = json.loads(config_path.read_text()).get("weights_source")
    return [source] if source else []


def model_card_data(base_model: str | list[str] | None = "Qwen/Qwen3-VL-2B-Instruct", pipeline_tag: str = "text-to-3d",
                    license: str = "apache-2.0", datasets=None, tags=None, weights_sources=()) -> ModelCardData:
    """Card metadata. `weights_sources` (releases whose weights the folder carries, see [`folder_weights_sources`])
    set the licence of those weights and join `base_model`; a release with no known licence is refused."""
    if pipeline_tag not in PIPELINE_TAGS:
        raise ValueError(f"pipeline_tag must be one of {PIPELINE_TAGS}, got {pipeline_tag!r}.")
    base_tags = ["cg-mllm", "text-to-3d", "image-to-3d", "image-to-text", "3d-captioning", "mesh", "flow-matching",
                 "mixture-of-transformers"]
    base_models = [base_model] if isinstance(base_model, str) else list(base_model or [])
    licence = {"license": license}
    for source in weights_sources:
        if source not in WEIGHTS_LICENSES:
            raise ValueError(
                f"The folder carries weights from {source!r}, whose licence is not known here (known: "
                f"{sorted(WEIGHTS_LICENSES)}); write the card's licence metadata yourself."
            )
        licence = {key: value for key, value in WEIGHTS_LICENSES[source].items() if key != "note"}
        base_models += [source] if source not in base_models else []
    return ModelCardData(
        library_name="diffusers",
        pipeline_tag=pipeline_tag,
        base_model=base_models[0] if len(base_models) == 1 else (base_models or None),
        datasets=list(datasets or []),
        tags=base_tags + [t for t in (tags or []) if t not in base_tags],
        **licence,
    )


def render_model_card(repo_id: str, model_name: str | None = None, model_description: str = "",
                      training_summary: str = "", usage: str = "", evaluation: str = "", template_path=None,
                      folder=None, **card_data_kwargs) -> ModelCard:
    """A `ModelCard` from the template; `card_data_kwargs` go to [`model_card_data`].

    `usage` (Markdown, default: text/image -> 3D and captioning), `training_summary` (default: the paper's stage
    schedule) and `evaluation` (a section only when given) fill the card's sections. With `folder` (a saved
    pipeline) the licence and `base_model` follow the weights it carries: a Hunyuan3D-2.1 VAE makes the card
    Tencent's Hunyuan 3D 2.1 Community License, with a License section saying so."""
    template = Path(template_path or TEMPLATE_PATH)
    if not template.is_file():
        raise ValueError(f"Model card template {template} not found.")
    sources = folder_weights_sources(folder) if folder is not None else []
    card_data_kwargs.setdefault("weights_sources", sources)
    licence_note = " ".join(WEIGHTS_LICENSES[s]["note"] for s in card_data_kwargs["weights_sources"]
                            if s in WEIGHTS_LICENSES)
    return ModelCard.from_template(
        model_card_data(**card_data_kwargs),
        licence_note=licence_note,
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
    card = card or render_model_card(repo_id, folder=folder, **card_kwargs)
    card.save(folder / "README.md")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)


__all__ = ["PIPELINE_TAGS", "WEIGHTS_LICENSES", "folder_weights_sources", "model_card_data", "push_to_hub",
           "render_model_card"]
