"""DoRA (weight-decomposed LoRA): a LoRA pair plus a learned magnitude ``dora_scale``, so that a layer's weight
becomes ``W' = (W + s * up @ down) * dora_scale / ||W + s * up @ down||``.

Written by hand on top of peft's LoRA because of the norm's axis. A1111 1.10 normalises each *input* column
(over the output rows and the kernel) and broadcasts a ``dora_scale`` of shape ``(1, in)`` / ``(1, in, 1, 1)``;
ComfyUI and Forge tell the axis from that shape and apply the same formula to such a file. peft (and LyCORIS
since 3.2) normalise each *output* row instead, a file that A1111 would broadcast into a wrong weight without a
word, and no exact conversion between the two exists. So the trained network uses A1111's axis, the one all
three hosts agree on. The hosts apply a multiplier m as ``W + m * (W' - W)``.

Along the input axis the decomposition is a per-input-channel scale: ``W' x = (W + s * up @ down) (d * x)`` with
``d = dora_scale / ||W + s * up @ down||``, so a forward pre-hook scales the layer's input and peft's LoRA layer
runs unchanged. The norm is treated as a constant in the backward pass, as the DoRA paper (section 4.3) and
peft do, which saves the memory of its graph.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .inject import ADAPTER
from .lora import attach_lora, lora_tensors

log = logging.getLogger(__name__)

# The magnitude's name on each adapted layer (a name peft does not use).
MAGNITUDE = "train_tools_dora_scale"


def attach_dora(
    model: nn.Module, targets: Sequence[str], rank: int, alpha: float, conv: tuple[int, float] | None = None
) -> nn.Module:
    """Attach a LoRA (``lora.attach_lora``) and give every adapted layer an input-axis magnitude, in place.

    The magnitude starts at the norms of the base weight's input columns, so the model is unchanged until
    training moves it or the LoRA. Float32 and trainable, like the LoRA weights.
    """
    attach_lora(model, targets, rank, alpha, conv_rank=conv[0] if conv else None, conv_alpha=conv[1] if conv else None)
    modules = dict(model.named_modules())
    for module in (modules[t] for t in targets):  # these only: a model may get its network in parts
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A and not hasattr(module, MAGNITUDE):
            weight = module.get_base_layer().weight.detach().float()
            module.register_parameter(MAGNITUDE, nn.Parameter(_column_norms(weight)))
            module.register_forward_pre_hook(_scale_input)
    log.info("Attached DoRA magnitudes (input axis) to the LoRA layers of %s.", type(model).__name__)
    return model


def merged_weight(module: Any) -> torch.Tensor:
    """``W + s * up @ down`` of a LoRA layer, float32, in the base weight's shape."""
    base = module.get_base_layer().weight
    up = module.lora_B[ADAPTER].weight
    down = module.lora_A[ADAPTER].weight
    delta = (up.flatten(1).float() @ down.flatten(1).float()).reshape(base.shape)
    return base.float() + float(module.scaling[ADAPTER]) * delta


def _column_norms(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each input column of a weight (over the output rows and the kernel): shape ``(in,)``."""
    return weight.transpose(0, 1).flatten(1).norm(dim=1)


def _scale_input(module: Any, args: tuple) -> tuple:
    x = args[0]
    magnitude = getattr(module, MAGNITUDE)
    scale = magnitude / _column_norms(merged_weight(module)).detach()
    shape = [1] * x.dim()
    shape[1 if isinstance(module.get_base_layer(), nn.Conv2d) else -1] = -1
    return (x * scale.to(x.dtype).reshape(shape), *args[1:])


def dora_tensors(module: Any) -> dict[str, torch.Tensor] | None:
    """One layer's DoRA in the file's names: the LoRA's plus ``dora_scale`` in A1111's input-axis shape."""
    magnitude = getattr(module, MAGNITUDE, None)
    out = lora_tensors(module)
    if out is None or magnitude is None:
        return None
    base = module.get_base_layer().weight
    out["dora_scale"] = magnitude.reshape(1, -1, *[1] * (base.dim() - 2))
    return out


__all__ = ["MAGNITUDE", "attach_dora", "dora_tensors", "merged_weight"]
