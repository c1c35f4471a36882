"""The bound a training step is measured against: the same UNet doing only forward + backward on the step's
own inputs, and the model FLOPs of that (for MFU)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .timing import sync

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel


@dataclass
class BareInputs:
    noisy: torch.Tensor
    timesteps: torch.Tensor
    hidden: torch.Tensor
    added: dict[str, torch.Tensor] | None
    target: torch.Tensor

    def first(self, n: int) -> BareInputs:
        added = {k: v[:n] for k, v in self.added.items()} if self.added else None
        return BareInputs(self.noisy[:n], self.timesteps[:n], self.hidden[:n], added, self.target[:n])


def bare_inputs(args: Sequence[Any], dtype: torch.dtype) -> BareInputs:
    """The UNet's inputs of the trainer's last step (latents, text, noise, timesteps)."""
    latents, text, noise, timesteps = args[:4]
    hidden = getattr(text, "hidden", text)
    added = text.added_cond_kwargs(dtype) if hasattr(text, "added_cond_kwargs") else None
    added = {k: v.detach() for k, v in added.items()} if added else None  # no graph back into a trained encoder
    return BareInputs(latents.detach().to(dtype), timesteps.detach(), hidden.detach().to(dtype), added, noise.detach())


def _bare_step(
    unet: torch.nn.Module, x: BareInputs, autocast: Callable[[], Any], forward: Callable[..., Any] | None = None
) -> None:
    """One UNet forward + backward on ``x``; the gradients it leaves are the caller's to clear."""
    with autocast():
        pred = (forward or unet)(x.noisy, x.timesteps, x.hidden, added_cond_kwargs=x.added).sample
    F.mse_loss(pred.float(), x.target.float()).backward()
    del pred  # the graph's nodes are freed here, as the trainer frees its own within its step


def bare_step_between(trainer: Any, args: Sequence[Any], device: torch.device) -> float:
    """Seconds of one UNet forward + backward alone on ``args`` (a training step's inputs): no data, no text
    encoder, no optimizer, no bookkeeping. Run between two training steps, it leaves no trace on the next:
    the gradients it made are cleared as the trainer clears its own (in place when they are flat), and the
    weights are not touched.

    Synchronised at the end, as the trainer is (it reads the loss of every step).
    """
    unet = trainer.accelerator.unwrap_model(trainer.model.unet)
    inputs = bare_inputs(args, trainer.weight_dtype)
    sync(device)
    start = time.perf_counter()
    _bare_step(unet, inputs, trainer.accelerator.autocast)
    sync(device)
    seconds = time.perf_counter() - start
    if trainer.flat:
        for flat in trainer.optimized:
            flat.grad.zero_()
    else:
        for p in trainer.trainable:
            p.grad = None
    return seconds


def count_flops(
    unet: UNet2DConditionModel, x: BareInputs, autocast: Callable[[], Any], params: Sequence[torch.nn.Parameter]
) -> float:
    """Model FLOPs of one UNet forward + backward at the run's batch size.

    Counted at batch 1 and scaled (every op of the UNet is linear in the batch), without gradient
    checkpointing (its recomputation is extra work, not model FLOPs) and outside torch.compile.
    """
    from torch.utils.flop_counter import FlopCounterMode

    checkpointing = bool(getattr(unet, "is_gradient_checkpointing", False))
    if checkpointing:
        unet.disable_gradient_checkpointing()
    try:
        with FlopCounterMode(display=False) as counter:
            _bare_step(unet, x.first(1), autocast, forward=unet.forward)
        for p in params:
            p.grad = None
    finally:
        if checkpointing:
            unet.enable_gradient_checkpointing()
    return float(counter.get_total_flops()) * x.noisy.shape[0]
