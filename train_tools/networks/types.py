"""The network types of the ``network_type`` setting: attaching each to a model, the weights it trains, the
tensors each layer writes and what the file's metadata says about it, in one table.

A new type is a new module beside ``lora.py`` plus one row here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from .dora import MAGNITUDE, attach_dora, dora_tensors
from .inject import adapter_parameters
from .loha import attach_loha, loha_tensors
from .lokr import attach_lokr, lokr_tensors
from .lora import attach_lora, lora_tensors

# The settings of learning rates and dims by block, written in ss_network_args when set.
BLOCK_SETTINGS = (
    "down_lr_weight",
    "mid_lr_weight",
    "up_lr_weight",
    "block_dims",
    "block_alphas",
    "conv_block_dims",
    "conv_block_alphas",
)
# Names of the trained weights among a model's parameters (peft's and ours), e.g. for saving a run's state.
WEIGHT_MARKERS = ("lora_", "hada_", "lokr_", MAGNITUDE)


@dataclass(frozen=True)
class NetworkType:
    name: str
    algo: str  # LyCORIS' name for it in ``ss_network_args`` ("" = kohya's own networks.lora)
    attach: Callable[..., nn.Module]  # (model, targets, rank, alpha, conv, factor)
    tensors: Callable[[nn.Module], dict[str, torch.Tensor] | None]


def _lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float, conv: Any, factor: int) -> nn.Module:
    conv_rank, conv_alpha = conv if conv else (None, None)
    return attach_lora(model, targets, rank, alpha, conv_rank=conv_rank, conv_alpha=conv_alpha)


TYPES: dict[str, NetworkType] = {
    "lora": NetworkType("lora", "", _lora, lora_tensors),
    "locon": NetworkType("locon", "", _lora, lora_tensors),
    "loha": NetworkType("loha", "loha", lambda m, t, r, a, c, f: attach_loha(m, t, r, a, c), loha_tensors),
    "lokr": NetworkType("lokr", "lokr", attach_lokr, lokr_tensors),
    "dora": NetworkType("dora", "locon", lambda m, t, r, a, c, f: attach_dora(m, t, r, a, c), dora_tensors),
}


def attach_network(
    model: nn.Module,
    targets: Sequence[str],
    network_type: str,
    rank: int,
    alpha: float,
    conv: tuple[int, float] | None = None,
    factor: int = -1,
) -> nn.Module:
    """Attach a network of ``network_type`` to exactly ``targets`` of ``model`` (in place); frozen base, float32
    trainable weights. ``conv`` is the 3x3 convolutions' (dim, alpha), None where they have none."""
    return network_type_named(network_type).attach(model, targets, rank, alpha, conv, factor)


def network_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights a network of any type trains in ``model``, in model order (what the optimizer gets)."""
    params = adapter_parameters(model)
    params += [getattr(m, MAGNITUDE) for m in model.modules() if isinstance(getattr(m, MAGNITUDE, None), nn.Parameter)]
    return params


def layer_tensors(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """One adapted layer's tensors under the file's names (``lora_down.weight``, ``hada_w1_a``, ``dora_scale`` ...,
    and ``alpha``), or None for a layer without a network."""
    for write in (dora_tensors, lora_tensors, loha_tensors, lokr_tensors):
        found = write(module)
        if found is not None:
            return found
    return None


def network_metadata(config: TrainConfig) -> tuple[str, dict[str, str]]:
    """``ss_network_module`` and ``ss_network_args`` as kohya (LoRA, LoCon) and LyCORIS (the others) write them."""
    kind = network_type_named(config.network_type)
    conv = config.conv_rank()
    args: dict[str, str] = {}
    if kind.algo:
        args["algo"] = kind.algo
    if conv is not None:
        args.update({"conv_dim": str(conv[0]), "conv_alpha": str(float(conv[1]))})
    if kind.name == "lokr":
        args["factor"] = str(config.lokr_factor)
    if kind.name == "dora":
        args.update({"dora_wd": "True", "wd_on_output": "False"})
    if config.loraplus_lr_ratio:
        args["loraplus_lr_ratio"] = str(float(config.loraplus_lr_ratio))
    for name in BLOCK_SETTINGS:  # as given, as kohya records them
        if getattr(config, name).strip():
            args[name] = getattr(config, name).replace(" ", "")
    return ("lycoris.kohya" if kind.algo else "networks.lora"), args


def network_type_named(name: str) -> NetworkType:
    try:
        return TYPES[name]
    except KeyError:
        raise ValueError(f"Unknown network type {name!r}; expected one of {', '.join(TYPES)}.") from None


__all__ = [
    "TYPES",
    "WEIGHT_MARKERS",
    "NetworkType",
    "attach_network",
    "layer_tensors",
    "network_metadata",
    "network_parameters",
    "network_type_named",
]
