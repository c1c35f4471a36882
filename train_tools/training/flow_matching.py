"""Flow matching, the training objective of FLUX.1, SD3.5 and Z-Image (issue 19; not wired into the trainer yet):
the noise level ``t`` in [0, 1] a step trains at, the noisy input and the target.

The model sees ``(1 - t) * latents + t * noise`` at timestep ``1000 t`` and predicts the velocity
``noise - latents``. How ``t`` is drawn is the setting kohya calls ``timestep_sampling``:

- ``uniform``: ``t ~ U(0, 1)``;
- ``sigmoid``: ``t = sigmoid(scale * z)``, ``z ~ N(0, 1)`` (kohya's FLUX.1 default; SD3's "logit-normal" with
  mean 0 and std ``scale``);
- ``logit_normal``: ``t = sigmoid(mean + std * z)`` (SD3's ``weighting_scheme``);
- ``shift``: the sigmoid draw moved towards noise, ``t' = s t / (1 + (s - 1) t)`` (``discrete_flow_shift`` s;
  SD3's scheduler shift, 3.0);
- ``flux_shift``: the sigmoid draw shifted by the picture's size as FLUX.1-dev's scheduler does,
  ``t' = e^mu / (e^mu + 1/t - 1)`` with ``mu`` linear in the number of latent patches, 0.5 at 256 and 1.15 at 4096.

Written here, a few lines each, because diffusers' ``training_utils`` (which has the uniform and logit-normal draws)
does not import with the transformers A1111 pins, and kohya's functions are not a library.
"""

from __future__ import annotations

import math

import torch

TIMESTEP_SAMPLINGS = ("uniform", "sigmoid", "logit_normal", "shift", "flux_shift")
NUM_TRAIN_TIMESTEPS = 1000
# FLUX.1-dev's scheduler: the shift mu grows linearly from 0.5 at 256 latent patches to 1.15 at 4096.
FLUX_BASE_SEQ, FLUX_MAX_SEQ, FLUX_BASE_SHIFT, FLUX_MAX_SHIFT = 256, 4096, 0.5, 1.15


def flux_mu(image_seq_len: int) -> float:
    """FLUX.1-dev's resolution-dependent shift for a picture of ``image_seq_len`` latent patches (2x2 each)."""
    slope = (FLUX_MAX_SHIFT - FLUX_BASE_SHIFT) / (FLUX_MAX_SEQ - FLUX_BASE_SEQ)
    return FLUX_BASE_SHIFT + slope * (image_seq_len - FLUX_BASE_SEQ)


def shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``t`` moved towards noise by the scheduler shift ``shift`` (1: unchanged)."""
    return shift * t / (1 + (shift - 1) * t)


def sample_t(
    batch: int,
    method: str,
    *,
    generator: torch.Generator | None = None,
    sigmoid_scale: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    discrete_flow_shift: float = 3.0,
    image_seq_len: int | None = None,
) -> torch.Tensor:
    """``batch`` noise levels in (0, 1) drawn as ``method`` (``TIMESTEP_SAMPLINGS``), float32 on the CPU."""
    if method not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"Unknown timestep sampling {method!r}; expected one of {', '.join(TIMESTEP_SAMPLINGS)}.")
    if method == "uniform":
        return torch.rand(batch, generator=generator)
    z = torch.randn(batch, generator=generator)
    if method == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * z)
    t = torch.sigmoid(sigmoid_scale * z)
    if method == "shift":
        return shifted(t, discrete_flow_shift)
    if method == "flux_shift":
        if image_seq_len is None:
            raise ValueError("flux_shift needs the picture's number of latent patches (image_seq_len).")
        return shifted(t, math.exp(flux_mu(image_seq_len)))
    return t


def noisy_input(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model's input at noise level ``t`` (one per item): ``(1 - t) * latents + t * noise``."""
    t = t.to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
    return (1 - t) * latents + t * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict: the velocity ``noise - latents``."""
    return noise - latents


def timesteps_of(t: torch.Tensor) -> torch.Tensor:
    """The timestep the transformer is given for noise level ``t`` (diffusers' flow schedulers: ``1000 t``)."""
    return t * NUM_TRAIN_TIMESTEPS


__all__ = [
    "TIMESTEP_SAMPLINGS",
    "flux_mu",
    "noisy_input",
    "sample_t",
    "shifted",
    "timesteps_of",
    "velocity_target",
]
