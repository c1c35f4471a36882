"""Flow matching (issue 19, a part not yet in the trainer): the noise-level draws against their formulas and
against diffusers' own flow scheduler (its shift, FLUX.1-dev's resolution shift, its noising), the target."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from train_tools.training import flow_matching as fm

N = 20_000


def draws(method: str, **kwargs: float) -> torch.Tensor:
    return fm.sample_t(N, method, generator=torch.Generator().manual_seed(0), **kwargs)


def test_each_draw_has_its_distribution() -> None:
    uniform = draws("uniform")
    assert abs(float(uniform.mean()) - 0.5) < 0.01 and abs(float((uniform < 0.25).float().mean()) - 0.25) < 0.01
    # logit-normal: the logit of t is N(mean, std)
    logit = torch.logit(draws("logit_normal", logit_mean=0.5, logit_std=2.0))
    assert abs(float(logit.mean()) - 0.5) < 0.05 and abs(float(logit.std()) - 2.0) < 0.05
    logit = torch.logit(draws("sigmoid", sigmoid_scale=1.5))
    assert abs(float(logit.mean())) < 0.05 and abs(float(logit.std()) - 1.5) < 0.05
    # shift 3 moves the median 0.5 to 3 * 0.5 / (1 + 2 * 0.5) = 0.75; flux_shift by e^mu at 1024 patches
    assert abs(float(draws("shift", discrete_flow_shift=3.0).median()) - 0.75) < 0.01
    mu = fm.flux_mu(1024)
    median = math.exp(mu) / (math.exp(mu) + 1)
    assert abs(float(draws("flux_shift", image_seq_len=1024).median()) - median) < 0.01
    for method in fm.TIMESTEP_SAMPLINGS:
        t = draws(method, image_seq_len=4096)
        assert t.shape == (N,) and bool(((t >= 0) & (t <= 1)).all()), method
    with pytest.raises(ValueError, match="Unknown timestep sampling"):
        fm.sample_t(2, "cosine")
    with pytest.raises(ValueError, match="image_seq_len"):
        fm.sample_t(2, "flux_shift")


def test_the_draws_are_the_seeds() -> None:
    a = fm.sample_t(8, "shift", generator=torch.Generator().manual_seed(3))
    b = fm.sample_t(8, "shift", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, fm.sample_t(8, "shift", generator=torch.Generator()))


def test_shifts_and_noising_are_diffusers_flow_schedulers() -> None:
    try:
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    except (ImportError, RuntimeError) as exc:  # a host's diffusers may predate FLUX.1
        pytest.skip(f"this diffusers has no flow-matching scheduler: {exc}")
    t = torch.linspace(0.05, 0.95, 10)
    static = FlowMatchEulerDiscreteScheduler(shift=3.0)
    static.set_timesteps(sigmas=t.numpy())
    torch.testing.assert_close(fm.shifted(t, 3.0), static.sigmas[:-1].float())
    for seq_len in (256, 1024, 4096):
        # FLUX.1-dev's scheduler config gives the pipeline 256 / 4096 / 0.5 / 1.15 (older diffusers default 1.16)
        assert fm.flux_mu(seq_len) == pytest.approx(calculate_shift(seq_len, 256, 4096, 0.5, 1.15))
        dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        dynamic.set_timesteps(sigmas=t.numpy(), mu=fm.flux_mu(seq_len))
        torch.testing.assert_close(fm.shifted(t, math.exp(fm.flux_mu(seq_len))), dynamic.sigmas[:-1].float())
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t3 = torch.tensor([0.0, 0.3, 1.0])
    mixed = fm.noisy_input(latents, noise, t3)
    assert torch.equal(mixed[0], latents[0]) and torch.equal(mixed[2], noise[2])
    plain = FlowMatchEulerDiscreteScheduler(shift=1.0)
    plain.set_timesteps(sigmas=np.array([0.3, 0.6], dtype=np.float32))  # its noising at a timestep of its own schedule
    torch.testing.assert_close(mixed[1:2], plain.scale_noise(latents[1:2], plain.timesteps[:1], noise[1:2]))
    assert float(plain.timesteps[0]) == pytest.approx(float(fm.timesteps_of(t3)[1]))
    # the target is the velocity: the path's derivative in t
    eps = 1e-3
    derivative = (
        fm.noisy_input(latents, noise, t3 * 0 + 0.5 + eps) - fm.noisy_input(latents, noise, t3 * 0 + 0.5)
    ) / eps
    torch.testing.assert_close(derivative, fm.velocity_target(latents, noise), rtol=1e-2, atol=1e-2)
