"""`torch.compile` of a training step computes what eager computes: the recipe's `--compile` (train_vae `--compile`,
the stages' `training.torch_compile`) is an efficiency option, not a different training run.

Inductor on the CPU (the backend both options use): one training step of a tiny ShapeVAE and of a tiny CG-MLLM, same
inputs and random streams, loss and every gradient equal to float32 rounding. Compilation takes tens of seconds on a
2-core machine, so the models are the smallest that still run every path (MoT text and 3D rows, flow and text
losses; the VAE's encoder, decoder and KL)."""

import numpy as np
import pytest
import torch


def _loss_and_grads(module, loss_fn):
    module.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def _assert_same_step(eager, compiled, what):
    (loss_e, grads_e), (loss_c, grads_c) = eager, compiled
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6, msg=f"{what}: loss")
    assert grads_c.keys() == grads_e.keys() and grads_e, what
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-5, msg=f"{what}: gradient of {name}")


@pytest.fixture
def deterministic_inductor(monkeypatch):
    # Inductor draws random numbers with its own generator unless told to call torch's (eager's) ones.
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_vae_training_step_equals_eager(deterministic_inductor):
    from cgmllm.training.train_vae import build_vae

    torch.manual_seed(0)
    vae = build_vae(num_latents=8, embed_dim=4, width=16, heads=2, encoder_layers=1, decoder_layers=1,
                    num_points=64, downsample_ratio=8).train()
    rng = np.random.default_rng(0)
    surface = torch.from_numpy(rng.normal(size=(2, 64, 7)).astype(np.float32))
    points = torch.from_numpy(rng.uniform(-1, 1, size=(2, 96, 3)).astype(np.float32))
    labels = (points.norm(dim=-1) < 0.8).float()

    def step(compute_loss):
        # train_vae's call: a posterior sample and the FPS starts from a seeded generator.
        return _loss_and_grads(vae, lambda: compute_loss(surface, points, labels, num_latents=8,
                                                         generator=torch.Generator().manual_seed(1)).loss)

    _assert_same_step(step(vae.compute_loss), step(torch.compile(vae.compute_loss)), "ShapeVAE")


def test_compiled_cgmllm_training_step_equals_eager(deterministic_inductor):
    from cgmllm.training.collator import CGMLLMDataCollator
    from cgmllm.training.testing import tiny_model, tiny_processor

    captions = ["a tall cylinder", "a flat box lying on its side"]
    processor = tiny_processor(captions)
    model = tiny_model(processor, num_hidden_layers=1).train()
    collator = CGMLLMDataCollator(processor, 8, task_weights={"text_to_shape": 1.0, "shape_caption": 1.0},
                                  condition_dropout=0.0, seed=0)
    rng = np.random.default_rng(0)
    batch = collator([{"uid": str(i), "caption": caption, "latents": rng.normal(size=(8, 8)).astype(np.float32)}
                      for i, caption in enumerate(captions * 2)])
    assert batch["shape_loss_mask"].any() and (batch["labels"] != -100).any()  # both losses take part

    def step(forward):
        torch.manual_seed(3)  # the flow times and noise the forward draws
        return _loss_and_grads(model, lambda: forward(**batch).loss)

    # As the Trainer does with `torch_compile: true` (accelerate compiles the model's forward).
    _assert_same_step(step(model), step(torch.compile(model)), "CG-MLLM")
