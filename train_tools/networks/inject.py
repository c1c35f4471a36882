"""Putting a peft adapter (LoRA, LoHa or LoKr) on exactly the chosen layers, and checking that it did.

peft builds the adapters; this module checks what peft cannot know about our use: every requested layer and
no other got one, the 3x3 convolutions got their own rank, and the weights train in float32.

Precision: peft casts a new adapter to the dtype of the layer it wraps, so on an fp16/bf16 base the adapter
would start in fp16/bf16. ``inject`` casts it back to float32. That is safe: peft's LoRA forward casts the
layer input to the adapter's dtype and back, and LoHa/LoKr run under the trainer's autocast, so float32 weights
train (and their optimizer state lives) in float32 on a half-precision base.
"""

from __future__ import annotations

import logging
import types
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from peft import inject_adapter_in_model
from peft.tuners.lycoris_utils import LycorisLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .targets import CONV3X3_PATTERN, is_conv3x3

log = logging.getLogger(__name__)

ADAPTER = "default"


def conv_patterns(
    model: nn.Module, targets: Sequence[str], conv: tuple[int, float] | None
) -> tuple[dict[str, int], dict[str, float]]:
    """peft's ``rank_pattern`` / ``alpha_pattern`` that give the 3x3 convolutions their own rank and alpha."""
    modules = dict(model.named_modules())
    if conv is None or not any(is_conv3x3(modules[t]) for t in targets if t in modules):
        return {}, {}
    return {CONV3X3_PATTERN: int(conv[0])}, {CONV3X3_PATTERN: float(conv[1])}


def check_targets(model: nn.Module, targets: Sequence[str], rank: int) -> list[str]:
    """The targets without duplicates, after checking that each is a layer of ``model`` without an adapter."""
    targets = list(dict.fromkeys(targets))
    if not targets:
        raise ValueError("A network needs at least one target module.")
    if rank < 1:
        raise ValueError(f"The network rank must be at least 1, got {rank}.")
    modules = dict(model.named_modules())
    missing = [t for t in targets if t not in modules]
    if missing:
        raise ValueError(f"{len(missing)} target modules are not in the model, e.g. {missing[0]!r}.")
    already = [t for t in targets if isinstance(modules[t], BaseTunerLayer)]
    if already:
        raise ValueError(f"{already[0]!r} already has an adapter; attach a network only once per model.")
    return targets


def inject(model: nn.Module, targets: Sequence[str], config: Any) -> dict[str, nn.Module]:
    """Inject the adapter of peft ``config`` into exactly ``targets`` (in place); the adapted layers by path.

    The 3x3 convolutions must get the rank of the config's ``rank_pattern`` (``conv_patterns``), when it has one.
    The base model is frozen; the adapter's weights are float32 and trainable.
    """
    conv_rank = next(iter(config.rank_pattern.values()), None)
    conv3x3 = {t for t in targets if is_conv3x3(dict(model.named_modules())[t])}
    before = set(_adapted(model))  # a model may get its network in parts (block dims): one call per part
    model.requires_grad_(False)
    with warnings.catch_warnings():
        # peft warns that a second part makes "multiple adapters": it is one adapter, on other layers.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    injected = {name: m for name, m in _adapted(model).items() if name not in before}
    if set(injected) != set(targets):
        raise RuntimeError(f"peft adapted {len(injected)} layers but {len(targets)} were requested.")
    if conv_rank is not None:
        wrong = [t for t in conv3x3 if _ranks(injected[t])[ADAPTER] != conv_rank]
        if wrong:
            raise RuntimeError(f"The convolutions' rank was not applied to {wrong[0]!r}.")
    for param in adapter_parameters(model):
        param.data = param.data.float()
        param.requires_grad_(True)
    for layer in injected.values():
        if isinstance(layer, LycorisLayer) and not hasattr(layer, "_cast_input_dtype"):
            layer._get_delta_activations = types.MethodType(_delta_in_float32, layer)
    return injected


def _delta_in_float32(layer: Any, adapter: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """LoHa/LoKr's update on an input cast to the adapter's float32, cast back: what peft's LoRA does, and peft's
    LoHa/LoKr since 0.14. Forge's peft 0.13 passes a half-precision input straight to the float32 update, which
    fails where no autocast runs (A1111's accelerate 0.21 autocasts only on CUDA)."""
    out = type(layer)._get_delta_activations(layer, adapter, x.float(), *args, **kwargs)
    return out.to(x.dtype)


def _adapted(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer) and ADAPTER in _ranks(m)}


def _ranks(module: nn.Module) -> dict[str, int]:
    ranks = getattr(module, "r", {})
    return ranks if isinstance(ranks, dict) else {}


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The peft adapter weights in ``model``, in model order (peft's ``adapter_layer_names`` order per layer)."""
    params: list[nn.Parameter] = []
    for module in model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for attr in module.adapter_layer_names:
            holder = getattr(module, attr, None)
            if holder is None or ADAPTER not in holder:
                continue
            item = holder[ADAPTER]
            params.extend(item.parameters() if isinstance(item, nn.Module) else [item])
    return params


__all__ = ["ADAPTER", "adapter_parameters", "check_targets", "conv_patterns", "inject"]
