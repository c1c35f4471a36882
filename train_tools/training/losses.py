"""The loss and noise options of a training step, as pure functions of tensors (kohya's option names and
formulas, from its documentation): the loss types, huber's c and its schedule over the noise level, the
debiased-estimation weight, pyramid (multi-resolution) noise and the adaptive noise offset.

The trainer's step (``trainer_step.py``) calls these; each is tested against its formula on fixed tensors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def per_item_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    loss_type: str,
    huber_c: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each batch item's mean loss (float32): ``l2`` squared error, ``l1`` absolute error, ``huber`` the pseudo-
    Huber loss ``2c (sqrt(d^2 + c^2) - c)`` and ``smooth_l1`` ``2 (sqrt(d^2 + c^2) - c)``, with one ``c`` per
    item (``huber_c``, shape (B,)). With ``mask`` (B, 1, h, w in [0, 1], the masked loss) the mean is over the
    masked area only, each latent pixel weighted by its mask value."""
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        loss = F.mse_loss(pred, target, reduction="none")
    elif loss_type == "l1":
        loss = F.l1_loss(pred, target, reduction="none")
    elif loss_type in ("huber", "smooth_l1"):
        c = huber_c.float().to(pred.device).reshape(-1, *[1] * (pred.dim() - 1))
        soft = torch.sqrt((pred - target) ** 2 + c**2) - c
        loss = 2 * c * soft if loss_type == "huber" else 2 * soft
    else:
        raise ValueError(f"Unknown loss type {loss_type!r}.")
    dims = tuple(range(1, loss.dim()))
    if mask is None:
        return loss.mean(dim=dims)
    weight = mask.float().to(loss.device).expand_as(loss)
    return (loss * weight).sum(dim=dims) / weight.sum(dim=dims).clamp(min=1e-6)


def huber_c_for(schedule: str, huber_c: float, timesteps: torch.Tensor, scheduler: Any) -> torch.Tensor:
    """Huber's c for each item at its timestep: ``constant``; ``exponential``, from 1 at t=0 down to ``huber_c`` at
    the last step; ``snr``, ``(1 - c) / (1 + sigma)^2 + c`` with ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``:
    close to 1 (l2-like) at low noise and to ``huber_c`` at high noise."""
    t = timesteps.to("cpu")
    if schedule == "constant":
        return torch.full(t.shape, float(huber_c))
    if schedule == "exponential":
        steps = int(scheduler.config.num_train_timesteps)
        return torch.exp(t.float() * (math.log(huber_c) / steps))
    if schedule == "snr":
        alpha_bar = scheduler.alphas_cumprod.to(torch.float32)[t]
        sigma = ((1.0 - alpha_bar) / alpha_bar).sqrt()  # inf at a zero-terminal-SNR last step: c = huber_c there
        return (1.0 - huber_c) / (1.0 + sigma) ** 2 + huber_c
    raise ValueError(f"Unknown huber schedule {schedule!r}.")


def debiased_weight(snr: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """kohya's debiased estimation: 1 / sqrt(SNR) (1 / (SNR + 1) for v-prediction), the SNR capped at 1000 so
    the almost noiseless steps do not vanish."""
    snr = torch.clamp(snr, max=1000.0)
    if v_prediction:
        return 1.0 / (snr + 1.0)
    return 1.0 / torch.sqrt(snr.clamp(min=1e-12))


def pyramid_noise(
    noise: torch.Tensor, generator: torch.Generator | None, iterations: int, discount: float
) -> torch.Tensor:
    """Noise plus ``iterations`` levels of coarser noise, each upsampled to the latent size and weighted by
    ``discount ** level``, then scaled back to unit standard deviation (multi-resolution "pyramid" noise).
    Each level shrinks the size by a random factor between 2 and 4, drawn from ``generator``."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for level in range(1, iterations + 1):
        factor = (2.0 + 2.0 * float(torch.rand((), generator=generator))) ** level
        hn, wn = max(1, int(h / factor)), max(1, int(w / factor))
        coarse = torch.randn((b, c, hn, wn), generator=generator).to(noise.device, noise.dtype)
        out = out + F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * discount**level
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def noise_offsets(
    latents: torch.Tensor, offset: torch.Tensor, noise_offset: float, adaptive_scale: float
) -> torch.Tensor:
    """The per-channel offset noise ``offset * strength`` (shape (B, C, 1, 1)), the strength ``noise_offset`` plus
    ``adaptive_scale`` times the absolute mean of each latent channel, never below 0 (kohya's adaptive offset)."""
    strength = torch.full_like(offset, float(noise_offset))
    if adaptive_scale:
        mean = latents.float().mean(dim=(2, 3), keepdim=True).abs().to(offset.device)
        strength = torch.clamp(strength + adaptive_scale * mean, min=0.0)
    return offset * strength


__all__ = ["debiased_weight", "huber_c_for", "noise_offsets", "per_item_loss", "pyramid_noise"]


def latent_mask(path: Path, shape: tuple[int, ...], flip: bool) -> torch.Tensor:
    """A prepared loss mask (``L`` picture, white = learned) at latent size (1, h, w) in [0, 1]: each latent
    pixel the mean of the pixels it covers; mirrored with ``flip``."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        values = torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)[None, None]
    if flip:
        values = values.flip(-1)
    return F.interpolate(values, size=tuple(int(n) for n in shape), mode="area")[0]
