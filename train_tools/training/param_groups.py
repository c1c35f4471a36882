"""The optimizer's parameter groups: each network weight at its learning rate.

By default one group per model part (the UNet's network, the text encoders'), at its learning rate. LoRA+
(``loraplus_lr_ratio``, Hayou et al., 2024) multiplies the rate of the up matrices (peft's ``lora_B``), and the
block weights (``down_lr_weight`` / ``mid_lr_weight`` / ``up_lr_weight``, networks/blocks.py) the rate of each
UNet block; weights that end up at the same rate share a group, in model order.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import TrainConfig
from ..config_values import block_weights
from ..networks.blocks import weight_of
from ..networks.types import network_parameters

UP_MARKER = "lora_B"  # peft's name of LoRA's up matrix (the file's lora_up)


def lr_groups(model: nn.Module, lr: float, config: TrainConfig, *, unet: bool) -> list[dict[str, Any]]:
    """The groups of ``model``'s network weights (float32 from here on): ``lr`` times the LoRA+ ratio for the
    up matrices and, on the UNet, times the weight of the block each weight lies in."""
    params = network_parameters(model)
    names = {id(p): name for name, p in model.named_parameters()}
    blocks = block_weights(config.down_lr_weight, config.mid_lr_weight, config.up_lr_weight) if unet else None
    ratio = float(config.loraplus_lr_ratio) or 1.0
    by_lr: dict[float, list[nn.Parameter]] = {}
    for param in params:
        param.data = param.data.float()  # the weights train in fp32 on an fp16/bf16 base (autocast mixes)
        name = names.get(id(param), "")
        rate = lr * weight_of(blocks, name) * (ratio if UP_MARKER in name else 1.0)
        by_lr.setdefault(rate, []).append(param)
    return [{"params": group, "lr": rate} for rate, group in by_lr.items()]


def kept_targets(targets: list[str], config: TrainConfig) -> list[str]:
    """The UNet targets without those in blocks of weight 0 (left out, as kohya leaves them out)."""
    blocks = block_weights(config.down_lr_weight, config.mid_lr_weight, config.up_lr_weight)
    return [t for t in targets if weight_of(blocks, t) > 0.0]


__all__ = ["kept_targets", "lr_groups"]
