"""Offloading: diffusers' `enable_model_cpu_offload` / `enable_sequential_cpu_offload` on the tiny pipeline.

No accelerator is lent here, so the hooks run with `device="cpu"`: the hooks are the real accelerate ones and fire in
the real order (recorded below), the weights just do not change device. Sequential offload really moves every weight
to the `meta` device and streams it back per submodule, so it checks that no code path reads a parameter's device.
"""

import pytest
import torch
import trimesh
from test_pipeline import N, PROMPTS, STEPS, _seed, _tiny_pipeline


pytest.importorskip("accelerate")


def _record_hooks(pipe):
    """Record `<component>:on` when accelerate's offload hook brings a component to the execution device and
    `<component>:off` when it sends it back to the CPU."""
    events = []
    for name in ("model", "vae"):
        hook = getattr(pipe, name)._hf_hook
        pre_forward, init_hook = hook.pre_forward, hook.init_hook

        def on(module, *args, _name=name, _pre=pre_forward, **kwargs):
            events.append(f"{_name}:on")
            return _pre(module, *args, **kwargs)

        def off(module, _name=name, _init=init_hook):
            events.append(f"{_name}:off")
            return _init(module)

        hook.pre_forward, hook.init_hook = on, off
    return events


def _dedupe(events):
    return [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]]


@pytest.fixture(scope="module")
def reference():
    pipe = _tiny_pipeline()
    latents = pipe(PROMPTS[0], num_inference_steps=STEPS, generator=_seed(), output_type="latent").latents
    return pipe, latents


def test_vae_public_methods_trigger_the_offload_hook(reference):
    pipe = _tiny_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")
    events = _record_hooks(pipe)
    latents = reference[1]
    features = pipe.vae.decode(latents)
    pipe.vae.query(features, torch.zeros(4, 3))
    pipe.vae.latents_to_mesh(latents, octree_resolution=8)
    surface = torch.rand(1, 256, 6, generator=_seed())
    pipe.vae.encode(surface, generator=_seed())
    assert events.count("vae:on") >= 4 and "model:on" not in events


def test_model_cpu_offload_order_for_generation_and_captioning(reference, tmp_path):
    ref_pipe, ref_latents = reference
    pipe = _tiny_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")
    events = _record_hooks(pipe)
    out = pipe(PROMPTS[0], num_inference_steps=STEPS, generator=_seed(), octree_resolution=8)
    torch.testing.assert_close(out.latents, ref_latents, rtol=0, atol=0)
    # Generation: the model, then the VAE decodes. The VAE's hook is chained to the model's, so the model goes back
    # to the CPU when the VAE starts (on a CPU "accelerator" accelerate skips that no-op move, so it is not recorded).
    order = _dedupe(events)
    assert order[0] == "model:on" and order[-1] == "vae:on" and order.count("vae:on") == 1
    assert pipe.vae._hf_hook.prev_module_hook.model is pipe.model

    # Captioning a mesh: the VAE encodes first and is offloaded *before* the model generates.
    # (`maybe_free_model_hooks` at the end of the call installed fresh hooks: record those.)
    events = _record_hooks(pipe)
    mesh_path = tmp_path / "sphere.ply"
    trimesh.creation.icosphere(subdivisions=2).export(mesh_path)
    caption = pipe.caption(mesh=mesh_path, max_new_tokens=3)
    order = _dedupe(events)
    assert order[:3] == ["vae:on", "vae:off", "model:on"] and "vae:on" not in order[1:]
    assert caption == ref_pipe.caption(mesh=mesh_path, max_new_tokens=3)


def test_sequential_cpu_offload_generates_the_same_latents(reference):
    _, ref_latents = reference
    from accelerate import cpu_offload

    pipe = _tiny_pipeline()
    # What `pipe.enable_sequential_cpu_offload(device=...)` installs on each component. Called with a CPU device that
    # method passes `cpu:0`, for which accelerate's weight reload returns plain tensors instead of parameters and
    # then fails, so the test installs the same hooks with the plain `cpu` device.
    for component in (pipe.model, pipe.vae):
        cpu_offload(component, torch.device("cpu"), offload_buffers=len(component._parameters) > 0)
    assert pipe.vae.post_kl.weight.device.type == "meta"
    assert pipe.model.lm_head.weight.device.type == "meta"
    out = pipe(PROMPTS[0], num_inference_steps=STEPS, generator=_seed(), output_type="latent")
    torch.testing.assert_close(out.latents, ref_latents, rtol=1e-5, atol=1e-5)
    assert pipe.vae.latents_to_mesh(out.latents, octree_resolution=8)[0] is not None
    assert out.latents.shape == (1, N, ref_latents.shape[-1])
