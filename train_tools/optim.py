"""Optimizers and learning-rate schedules by the names the tab shows."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from .errors import UserError

log = logging.getLogger(__name__)


def make_optimizer(name: str, param_groups: Iterable[dict[str, Any]], lr: float, *, device: torch.device
                   ) -> torch.optim.Optimizer:
    """Build the named optimizer over ``param_groups`` (each may carry its own ``lr``)."""
    groups = list(param_groups)
    cuda = device.type == "cuda"
    if name == "AdamW":
        # fused kernels on CUDA; foreach on CPU (both are torch's own fast paths).
        return torch.optim.AdamW(groups, lr=lr, weight_decay=1e-2, fused=cuda or None)
    if name == "SGDNesterov":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    if name == "Lion":
        from lion_pytorch import Lion

        return Lion(groups, lr=lr, weight_decay=0.0)
    if name == "Prodigy":
        from prodigyopt import Prodigy

        if lr < 0.1:
            log.warning("Prodigy finds its own step size and expects a learning rate near 1.0; %g was given.", lr)
        return Prodigy(groups, lr=lr, weight_decay=0.0)
    if name == "AdaFactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False)
    if name in ("AdamW8bit", "Lion8bit"):
        if not cuda:
            raise UserError(f"The {name} optimizer needs a CUDA GPU; choose AdamW or Lion to train on this device.")
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise UserError(f"The {name} optimizer needs bitsandbytes; install it with "
                            "'pip install bitsandbytes' or choose AdamW or Lion.") from exc
        cls = bnb.optim.AdamW8bit if name == "AdamW8bit" else bnb.optim.Lion8bit
        return cls(groups, lr=lr)
    raise UserError(f"Unknown optimizer '{name}'.")


def make_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int
                      ) -> torch.optim.lr_scheduler.LRScheduler:
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps,
                         num_training_steps=max(total_steps, 1))
