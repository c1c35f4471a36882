"""LoHa: the Hadamard (elementwise) product of two low-rank pairs, ``(w1_a @ w1_b) * (w2_a @ w2_b)``, on each
chosen layer; peft's LoHa adapter, written under the tensor names LyCORIS and every host use.

The product of two rank-r pairs reaches rank r**2, so a small dim holds as much as a larger LoRA: LyCORIS'
guide suggests dim 4-32 with alpha 1 to half the dim, which is also what kohya's GUI presets use.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from peft import LoHaConfig
from peft.tuners.loha import LoHaLayer
from torch import nn

from .inject import ADAPTER, check_targets, conv_patterns, inject

log = logging.getLogger(__name__)

_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def attach_loha(
    model: nn.Module, targets: Sequence[str], rank: int, alpha: float, conv: tuple[int, float] | None = None
) -> nn.Module:
    """Inject a LoHa adapter into exactly ``targets`` of ``model`` (in place) and return ``model``.

    peft's start: ``w2_b`` zero, the rest kaiming-uniform, so the update starts at zero. Scale alpha / rank.
    Convolutions use the plain (not Tucker) form, whose ``hada_w*_b`` are ``(rank, in * kh * kw)``: every host
    reads it.
    """
    targets = check_targets(model, targets, rank)
    rank_pattern, alpha_pattern = conv_patterns(model, targets, conv)
    config = LoHaConfig(
        r=int(rank),
        alpha=float(alpha),
        target_modules=targets,
        rank_dropout=0.0,
        module_dropout=0.0,
        use_effective_conv2d=False,
        init_weights=True,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    inject(model, targets, config)
    log.info("Attached LoHa (rank %d, alpha %g) to %d layers of %s.", rank, alpha, len(targets), type(model).__name__)
    return model


def loha_tensors(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """One layer's LoHa in the file's names (``hada_w1_a`` ... ``hada_w2_b``, ``alpha``), or None."""
    if not isinstance(module, LoHaLayer) or ADAPTER not in module.hada_w1_a:
        return None
    out = {part: getattr(module, part)[ADAPTER] for part in _PARTS}
    out["alpha"] = torch.tensor(float(module.alpha[ADAPTER]), dtype=torch.float32)
    return out


__all__ = ["attach_loha", "loha_tensors"]
