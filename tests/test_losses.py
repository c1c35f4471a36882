"""The loss and noise options (issue 18, item 2), each against its formula on fixed tensors, and each reaching
the trainer's step (the test fails where the trainer ignores it)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from tests import fixtures_training
from tests.test_precision import new_version
from tests.test_vpred import small
from train_tools.errors import UserError
from train_tools.training.losses import debiased_weight, huber_c_for, noise_offsets, per_item_loss, pyramid_noise
from train_tools.training.trainer import Trainer
from train_tools.training.trainer_step import signal_to_noise

demo_ckpt = fixtures_training.demo_ckpt
pictures = fixtures_training.pictures
one_thread = fixtures_training.one_thread

SCHED = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_each_loss_type_is_its_formula() -> None:
    pred = torch.tensor([[[[0.0, 1.0], [2.0, -3.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    target = torch.zeros_like(pred)
    c = torch.tensor([0.5, 2.0])
    d = [[0.0, 1.0, 2.0, 3.0], [0.5] * 4]
    cs = c.tolist()

    def mean(f, row: list[float], ci: float) -> float:  # noqa: ANN001 - a one-line formula
        return sum(f(x, ci) for x in row) / 4

    expected = {
        "l2": [mean(lambda x, _: x * x, row, 0) for row in d],
        "l1": [mean(lambda x, _: abs(x), row, 0) for row in d],
        "huber": [mean(lambda x, k: 2 * k * (math.sqrt(x * x + k * k) - k), d[i], cs[i]) for i in range(2)],
        "smooth_l1": [mean(lambda x, k: 2 * (math.sqrt(x * x + k * k) - k), d[i], cs[i]) for i in range(2)],
    }
    for kind, values in expected.items():
        torch.testing.assert_close(per_item_loss(pred, target, kind, c), torch.tensor(values), msg=kind)
    with pytest.raises(ValueError):
        per_item_loss(pred, target, "l3", c)


def test_huber_c_schedules() -> None:
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(huber_c_for("constant", 0.1, t, SCHED), torch.full((3,), 0.1))
    exp = huber_c_for("exponential", 0.1, t, SCHED)
    torch.testing.assert_close(exp, torch.tensor([1.0, 0.1**0.5, 0.1 ** (999 / 1000)]))
    alpha_bar = SCHED.alphas_cumprod[t]
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
    torch.testing.assert_close(huber_c_for("snr", 0.1, t, SCHED), 0.9 / (1 + sigma) ** 2 + 0.1)
    assert huber_c_for("snr", 0.1, t, SCHED)[0] > 0.9  # l2-like at low noise


def test_debiased_weight_and_adaptive_offset() -> None:
    snr = torch.tensor([0.25, 4.0, 5000.0])
    torch.testing.assert_close(debiased_weight(snr, False), torch.tensor([2.0, 0.5, 1000**-0.5]))
    torch.testing.assert_close(debiased_weight(snr, True), torch.tensor([0.8, 0.2, 1 / 1001]))
    latents = torch.ones(1, 2, 4, 4) * torch.tensor([0.5, -2.0]).reshape(1, 2, 1, 1)
    offset = torch.ones(1, 2, 1, 1)
    torch.testing.assert_close(noise_offsets(latents, offset, 0.1, 0.2), torch.tensor([0.2, 0.5]).reshape(1, 2, 1, 1))
    torch.testing.assert_close(noise_offsets(latents, offset, 0.1, -1.0), torch.zeros(1, 2, 1, 1))  # never below 0


def test_pyramid_noise_is_unit_noise_with_coarse_structure() -> None:
    base = torch.randn(8, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    noise = pyramid_noise(base, torch.Generator().manual_seed(1), 6, 0.8)
    assert abs(float(noise.std()) - 1.0) < 1e-4
    again = pyramid_noise(base, torch.Generator().manual_seed(1), 6, 0.8)
    assert torch.equal(noise, again)  # drawn from the generator: a resumed run draws the same

    # Coarse levels: neighbouring pixels correlate, white noise's do not.
    def neighbour_correlation(x: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1])

    assert neighbour_correlation(noise) > 0.3 > abs(neighbour_correlation(base))


def test_the_trainer_uses_each_option(tmp_path: Path, demo_ckpt: Path, pictures: Path) -> None:
    config = small(loss_type="huber", huber_c=0.3, huber_schedule="snr", debiased_estimation_loss=True)
    config = config.updated({"min_timestep": 200, "max_timestep": 300, "ip_noise_gamma": 0.5})
    trainer = Trainer(new_version(tmp_path, pictures), config, demo_ckpt, device="cpu")
    trainer.prepare()
    gen = torch.Generator().manual_seed(0)
    steps = trainer.sample_timesteps(500, gen)
    assert int(steps.min()) >= 200 and int(steps.max()) < 300
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8)
    noise = torch.randn_like(latents)
    timesteps = torch.tensor([250, 210])
    perturbed = trainer.perturbed_noise(noise, gen)
    assert perturbed is not None and not torch.equal(perturbed, noise)
    text = trainer.text_for([0, 0], random.Random(0))
    sched = trainer.noise_scheduler
    with torch.no_grad():
        loss = float(trainer.loss(latents, text, noise, timesteps, None, perturbed))
        pred = trainer.model.unet(sched.add_noise(latents, perturbed, timesteps), timesteps, text.hidden).sample
        c = 0.7 / (1 + ((1 - sched.alphas_cumprod[timesteps]) / sched.alphas_cumprod[timesteps]).sqrt()) ** 2 + 0.3
        huber = (
            2
            * c.reshape(-1, 1, 1, 1)
            * (torch.sqrt((pred - noise) ** 2 + c.reshape(-1, 1, 1, 1) ** 2) - c.reshape(-1, 1, 1, 1))
        ).mean(dim=(1, 2, 3))
        expected = float((huber / signal_to_noise(sched, timesteps).sqrt()).mean())
    assert loss == pytest.approx(expected, rel=1e-5)
    with pytest.raises(UserError, match="min_timestep"):
        config.updated({"min_timestep": 300})
