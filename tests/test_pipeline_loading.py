"""CGMLLMPipeline honours diffusers' loading and calling conventions: `from_pretrained(variant=, dtype=)` (dtype dicts
included), `return_dict=False` tuples, `num_images_per_prompt`."""

import shutil

import pytest
import torch
from test_pipeline import PROMPTS, _tiny_pipeline

from cgmllm.pipelines import CGMLLMPipeline


def _assert_same_weights(module, reference):
    expected = reference.state_dict()
    for name, value in module.state_dict().items():
        torch.testing.assert_close(value.float(), expected[name].float(), rtol=0, atol=1e-3, msg=name)


def _differ(module, reference):
    expected = reference.state_dict()
    return any(not torch.allclose(v.float(), expected[n].float(), atol=1e-3) for n, v in module.state_dict().items()
               if v.is_floating_point())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved pipeline whose model and VAE folders also hold `fp16` weights of another (differently seeded) one."""
    base, other = _tiny_pipeline(0), _tiny_pipeline(1)
    root = tmp_path_factory.mktemp("pipe")
    base.save_pretrained(root)
    variant_dir = tmp_path_factory.mktemp("variant")
    other.save_pretrained(variant_dir, variant="fp16")
    for component, weights in (("model", "model.fp16.safetensors"), ("vae", "diffusion_pytorch_model.fp16.safetensors")):
        shutil.copyfile(variant_dir / component / weights, root / component / weights)
    return root, base, other


def test_from_pretrained_honours_variant(saved, tmp_path):
    root, base, other = saved
    regular = CGMLLMPipeline.from_pretrained(root)
    _assert_same_weights(regular.model, base.model)
    _assert_same_weights(regular.vae, base.vae)
    fp16 = CGMLLMPipeline.from_pretrained(root, variant="fp16")
    _assert_same_weights(fp16.model, other.model)
    _assert_same_weights(fp16.vae, other.vae)
    assert _differ(fp16.model, base.model)
    with pytest.raises(ValueError, match="variant=ema"):
        CGMLLMPipeline.from_pretrained(root, variant="ema")
    # A component without files of the variant loads its regular weights (diffusers' rule).
    partial = tmp_path / "partial"
    shutil.copytree(root, partial)
    (partial / "vae" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    mixed = CGMLLMPipeline.from_pretrained(partial, variant="fp16")
    _assert_same_weights(mixed.model, other.model)
    _assert_same_weights(mixed.vae, base.vae)


def test_from_pretrained_honours_dtype_and_dtype_dicts(saved):
    root, _, _ = saved
    per_component = CGMLLMPipeline.from_pretrained(root, dtype={"model": torch.bfloat16, "default": torch.float16})
    assert per_component.model.dtype == torch.bfloat16 and per_component.vae.dtype == torch.float16
    only_vae = CGMLLMPipeline.from_pretrained(root, torch_dtype={"vae": torch.float16})
    assert only_vae.model.dtype == torch.float32 and only_vae.vae.dtype == torch.float16
    single = CGMLLMPipeline.from_pretrained(root, dtype=torch.bfloat16)
    assert single.model.dtype == torch.bfloat16 and single.vae.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="torch.dtype"):
        CGMLLMPipeline.from_pretrained(root, dtype="half")


def test_from_pretrained_hands_other_keywords_to_diffusers(saved):
    """A keyword the local loader does not handle goes to `DiffusionPipeline.from_pretrained`, which loads the
    folder's own code (and so asks for `trust_remote_code`)."""
    root, base, _ = saved
    with pytest.raises(ValueError, match="trust_remote_code"):
        CGMLLMPipeline.from_pretrained(root, low_cpu_mem_usage=False)
    remote = CGMLLMPipeline.from_pretrained(root, low_cpu_mem_usage=False, trust_remote_code=True)
    assert type(remote).__module__ != CGMLLMPipeline.__module__
    _assert_same_weights(remote.model, base.model)


def test_return_dict_false_matches_the_output_object():
    pipe = _tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=PROMPTS, num_inference_steps=2, guidance_scale=2.0)
    output = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(0))
    as_tuple = pipe(**call, output_type="latent", return_dict=False, generator=torch.Generator().manual_seed(0))
    assert output.meshes is None and isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_tuple[0], output[0])
    torch.testing.assert_close(as_tuple[0], output.latents)
    meshes, latents = pipe(**call, return_dict=False, generator=torch.Generator().manual_seed(0), octree_resolution=16)
    assert len(meshes) == len(PROMPTS)
    torch.testing.assert_close(latents, output.latents)


def test_num_images_per_prompt_is_num_meshes_per_prompt():
    pipe = _tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=PROMPTS, num_inference_steps=2, guidance_scale=2.0, output_type="latent")
    images = pipe(**call, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0)).latents
    meshes = pipe(**call, num_meshes_per_prompt=2, generator=torch.Generator().manual_seed(0)).latents
    assert images.shape[0] == 2 * len(PROMPTS)
    torch.testing.assert_close(images, meshes)
    with pytest.raises(ValueError, match="alias of `num_meshes_per_prompt`"):
        pipe(**call, num_images_per_prompt=2, num_meshes_per_prompt=3)
