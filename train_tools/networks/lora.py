"""LoRA and LoCon: a low-rank pair ``up @ down`` added to each chosen layer, attached with plain peft.

peft's ``inject_adapter_in_model`` works the same on a diffusers UNet and on a transformers CLIP text model,
and on every peft version the WebUI hosts ship (Forge pins 0.13). LoCon is the same adapter on the UNet's 3x3
convolutions too, at their own rank (``conv``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn

from .inject import ADAPTER, check_targets, conv_patterns, inject

log = logging.getLogger(__name__)


def attach_lora(
    model: nn.Module,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
) -> nn.Module:
    """Inject a LoRA adapter into exactly ``targets`` of ``model`` (in place) and return ``model``.

    A is kaiming-uniform and B zero (peft's default, the same start as kohya), so the model's output is
    unchanged until training moves B. The adapter's scale is ``alpha / rank`` (no rsLoRA), which is what
    the file's ``alpha`` means to every WebUI. 3x3 convolutions (LoCon) use ``conv_rank``/``conv_alpha`` when
    given (``conv_alpha`` defaults to 1, as in kohya); 1x1 convolutions and Linear layers use ``rank``.
    The base model is frozen; the LoRA parameters are float32 and trainable.
    """
    targets = check_targets(model, targets, rank)
    conv = None if conv_rank is None else (int(conv_rank), 1.0 if conv_alpha is None else float(conv_alpha))
    rank_pattern, alpha_pattern = conv_patterns(model, targets, conv)
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha),
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,
        use_rslora=False,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    inject(model, targets, config)
    log.info("Attached LoRA (rank %d, alpha %g) to %d layers of %s.", rank, alpha, len(targets), type(model).__name__)
    return model


def lora_tensors(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """One layer's LoRA in the file's names (``lora_down.weight``, ``lora_up.weight``, ``alpha``), or None."""
    if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_A:
        return None
    if ADAPTER in getattr(module, "lora_magnitude_vector", {}):
        raise ValueError("peft's DoRA adapters cannot be written in the kohya LoRA format; use dora.py's.")
    rank = module.r[ADAPTER]
    alpha = float(module.lora_alpha[ADAPTER])
    rslora = getattr(module, "use_rslora", {})
    if isinstance(rslora, dict) and rslora.get(ADAPTER, False):
        # The file's scale is alpha / rank; rsLoRA scales by alpha / sqrt(rank): keep the same update.
        alpha *= math.sqrt(rank)
    return {
        "lora_down.weight": module.lora_A[ADAPTER].weight,
        "lora_up.weight": module.lora_B[ADAPTER].weight,
        "alpha": torch.tensor(alpha, dtype=torch.float32),
    }


__all__ = ["attach_lora", "lora_tensors"]
