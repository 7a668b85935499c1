"""The default sampler is the official one: `t = linspace(1, 0, T)` shifted by 3, `T - 1` Euler steps ending at 0."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from cgmllm.pipelines import official_flow_sigmas


def _official_grid(num_timesteps: int, shift: float = 3.0) -> list[float]:
    """The official `inference.py` grid written out: T values from 1 to 0, each shifted."""
    return [shift * t / (1 + (shift - 1) * t) for t in np.linspace(1.0, 0.0, num_timesteps)]


# Hand-computed with s = 3: t -> 3t / (1 + 2t).
@pytest.mark.parametrize(
    "steps, expected",
    [
        (1, [1.0, 0.0]),
        (2, [1.0, 0.75, 0.0]),                      # t = 1/2 -> 1.5 / 2
        (4, [1.0, 0.9, 0.75, 0.5, 0.0]),            # t = 3/4 -> 2.25 / 2.5, 1/4 -> 0.75 / 1.5
        (5, [1.0, 12 / 13, 9 / 11, 2 / 3, 3 / 7, 0.0]),
    ],
)
def test_scheduler_with_official_sigmas_walks_the_hand_computed_grid(steps, expected):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps, sigmas=official_flow_sigmas(steps))
    np.testing.assert_allclose(scheduler.sigmas.numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(scheduler.timesteps.numpy(), np.array(expected[:-1]) * 1000, rtol=1e-6)


@pytest.mark.parametrize("num_timesteps", [2, 6, 26, 50, 101])
def test_official_num_timesteps_t_is_num_inference_steps_t_minus_one(num_timesteps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    steps = num_timesteps - 1
    scheduler.set_timesteps(steps, sigmas=official_flow_sigmas(steps))
    assert len(scheduler.timesteps) == steps
    np.testing.assert_allclose(scheduler.sigmas.numpy(), _official_grid(num_timesteps), rtol=0, atol=1e-6)


def test_default_50_timesteps_guide_41_of_49_steps():
    """The official default: 49 Euler steps, CFG only for 0.4 < t <= 1 (41 of them, official_cgmllm.md §3)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(49, sigmas=official_flow_sigmas(49))
    sigmas = scheduler.sigmas[:-1]
    assert int(((sigmas > 0.4) & (sigmas <= 1.0)).sum()) == 41


def test_diffusers_default_grid_is_not_the_official_one():
    """Why the pipeline passes sigmas: the scheduler's own spacing differs (what the issue measured)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    assert not np.allclose(scheduler.sigmas.numpy(), [1.0, 0.9, 0.75, 0.5, 0.0], atol=1e-3)


@pytest.mark.parametrize("bad", [0, -3, 2.5, None])
def test_official_flow_sigmas_rejects_bad_step_counts(bad):
    with pytest.raises(ValueError, match="num_inference_steps"):
        official_flow_sigmas(bad)


def test_pipeline_default_steps_follow_the_official_grid():
    """The pipeline's denoising loop, with default arguments except the step count, sees the official timesteps."""
    from test_pipeline import _tiny_pipeline

    pipe = _tiny_pipeline()
    seen = []

    def record(pipeline, step, timestep, callback_kwargs):
        seen.append(float(timestep))
        return {}

    pipe("a red car", num_inference_steps=4, guidance_scale=1.0, output_type="latent",
         generator=torch.Generator().manual_seed(0), callback_on_step_end=record)
    np.testing.assert_allclose(seen, [1000.0, 900.0, 750.0, 500.0], rtol=1e-6)
    import inspect

    assert inspect.signature(type(pipe).__call__).parameters["num_inference_steps"].default == 49
