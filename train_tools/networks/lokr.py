"""LoKr: the Kronecker product ``kron(w1, w2)`` of a small and a larger matrix on each chosen layer, the larger
one low-rank (``w2_a @ w2_b``) when the dim is small enough; peft's LoKr adapter, written under the tensor names
LyCORIS and every host use.

``factor`` splits each side of a layer into ``factor x rest`` (-1: as square as possible, LyCORIS' and peft's
default); a small factor gives very small files.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch
from peft import LoKrConfig, inject_adapter_in_model
from peft.tuners.lokr import LoKrLayer
from torch import nn

from .inject import ADAPTER, check_targets, conv_patterns, inject

log = logging.getLogger(__name__)

# A layer's LoKr weights, under peft's attribute names, which are the file's (w1 full or w2 full, else a pair).
_LOKR_PARTS = ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def attach_lokr(
    model: nn.Module,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    conv: tuple[int, float] | None = None,
    factor: int = -1,
) -> nn.Module:
    """Inject a LoKr adapter into exactly ``targets`` of ``model`` (in place) and return ``model``.

    peft's start: ``w1`` zero, so the update starts at zero. ``w1`` is always full (``decompose_both`` off, as
    LyCORIS defaults); ``w2`` is ``w2_a @ w2_b`` when ``rank`` is under half its larger side, else full.
    Convolutions use the plain (not Tucker) form, which every host reads.
    """
    targets = check_targets(model, targets, rank)
    rank_pattern, alpha_pattern = conv_patterns(model, targets, conv)
    config = LoKrConfig(
        r=int(rank),
        alpha=float(alpha),
        target_modules=targets,
        rank_dropout=0.0,
        module_dropout=0.0,
        use_effective_conv2d=False,
        decompose_both=False,
        decompose_factor=int(factor),
        init_weights=True,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    inject(model, targets, config)
    log.info(
        "Attached LoKr (rank %d, alpha %g, factor %d) to %d layers of %s.",
        rank,
        alpha,
        factor,
        len(targets),
        type(model).__name__,
    )
    return model


@functools.cache
def peft_scales_lokr() -> bool:
    """Whether this peft multiplies a LoKr's Kronecker product by its alpha / rank (a one-layer probe)."""
    probe = nn.Sequential(nn.Linear(4, 4, bias=False))
    inject_adapter_in_model(LoKrConfig(r=1, alpha=2.0, target_modules=["0"], init_weights=True), probe)
    layer: Any = probe[0]
    with torch.no_grad():
        for name in ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"):
            holder = getattr(layer, name)
            if ADAPTER in holder:
                holder[ADAPTER].fill_(1.0)
        delta = layer.get_delta_weight(ADAPTER)
    return not torch.allclose(delta, torch.ones_like(delta))


def lokr_tensors(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """One layer's LoKr in the file's names (``lokr_w1`` or ``lokr_w1_a``/``_b``, ``lokr_w2`` or
    ``lokr_w2_a``/``_b``, ``alpha``), or None.

    The hosts scale by alpha / dim only when a side is low-rank (the dim is then that side's rank) and by 1 when
    both are full; peft scales by alpha / rank (before 0.14, e.g. Forge's 0.13, it did not scale LoKr at all).
    The file carries the scale the trained layer applied: in ``lokr_w2`` when both sides are full, else in
    ``alpha``, so that every host applies the update that was trained.
    """
    if not isinstance(module, LoKrLayer) or ADAPTER not in module.r:
        return None
    out: dict[str, torch.Tensor] = {}
    for side in ("w1", "w2"):
        full = getattr(module, f"lokr_{side}")
        if ADAPTER in full:
            out[f"lokr_{side}"] = full[ADAPTER]
        else:
            out[f"lokr_{side}_a"] = getattr(module, f"lokr_{side}_a")[ADAPTER]
            out[f"lokr_{side}_b"] = getattr(module, f"lokr_{side}_b")[ADAPTER]
    scale = float(module.scaling[ADAPTER]) if peft_scales_lokr() else 1.0  # what the trained layer applied
    if "lokr_w2" in out:  # both sides full: the hosts apply no scale, so w2 carries it
        out["lokr_w2"] = out["lokr_w2"].detach() * scale
        alpha = float(module.alpha[ADAPTER])
    else:  # the hosts scale by alpha / (w2's rank)
        alpha = scale * out["lokr_w2_b"].shape[0]
    out["alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def load_lokr(module: nn.Module, parts: dict[str, torch.Tensor]) -> str | None:
    """Copy a file's LoKr layer (``lokr_w1``, ``lokr_w2`` or ``lokr_w2_a``/``_b``, ``alpha``) into ``module``'s
    freshly attached LoKr, so that the layer applies the update the hosts compute from the file; None, or the
    first part that does not fit (missing, or of another shape).

    The hosts scale by alpha / (w2's rank) when w2 is low-rank, else by 1; this layer by its own scale (see
    ``lokr_tensors``). The ratio goes into w1 (low-rank w2) or w2 (full), where ``lokr_tensors`` puts the scale
    when writing, so a file written by this trainer comes back bit for bit."""
    live = {name: getattr(module, name)[ADAPTER] for name in _LOKR_PARTS if ADAPTER in getattr(module, name)}
    for name, weight in live.items():
        if name not in parts or parts[name].shape != weight.shape:
            return name
    low_rank = "lokr_w2_b" in live
    alpha = parts.get("alpha")
    host = float(alpha) / live["lokr_w2_b"].shape[0] if low_rank and alpha is not None else 1.0
    layer: Any = module
    ratio = host / (float(layer.scaling[ADAPTER]) if peft_scales_lokr() else 1.0)
    with torch.no_grad():
        for name, weight in live.items():
            value = parts[name].to(weight.dtype)
            scaled = name == ("lokr_w1" if low_rank else "lokr_w2") and ratio != 1.0
            weight.copy_(value * ratio if scaled else value)
    return None


__all__ = ["attach_lokr", "load_lokr", "lokr_tensors"]
