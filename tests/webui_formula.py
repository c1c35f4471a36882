"""Test-only reference: how AUTOMATIC1111 applies a kohya LoRA file to a model's weights.

A1111 (extensions-builtin/Lora) splits every key at its first '.', looks the part before it up among the
model's layers named ``<prefix>_<module path with '_' for '.'>`` and adds
``up @ down * (alpha / rank) * multiplier`` to that layer's weight. It only logs keys it cannot match at
debug level; this reference raises instead, so a misnamed key fails a test rather than doing nothing.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


def layer_names(model: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """``<prefix>_<path>`` -> layer, for every Linear/Conv2d of ``model``.

    A1111's text encoder is transformers 4.x ``CLIPTextModel``, whose paths start with ``text_model.``;
    transformers 5 dropped that wrapper, so text-encoder paths get it back here (and only that form matches,
    as in A1111).
    """
    names: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if prefix.startswith("lora_te") and not path.startswith("text_model."):
            path = f"text_model.{path}"
        names[f"{prefix}_{path.replace('.', '_')}"] = module
    return names


def lora_update(
    down: torch.Tensor, up: torch.Tensor, alpha: float | None, multiplier: float, weight_shape: torch.Size
) -> torch.Tensor:
    """The weight delta A1111 adds for one layer (float32)."""
    down = down.float()
    up = up.float()
    rank = down.shape[0]
    scale = (rank if alpha is None else alpha) / rank * multiplier
    if down.dim() == 4:  # noqa: SIM108 - the two shapes read better apart
        # Conv: down keeps the kernel (rank, in, kh, kw), up is 1x1 (out, rank, 1, 1).
        delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    else:
        delta = up @ down
    if delta.shape != weight_shape:
        if delta.numel() != torch.Size(weight_shape).numel():
            raise AssertionError(f"LoRA delta shape {tuple(delta.shape)} does not fit weight {tuple(weight_shape)}")
        delta = delta.reshape(weight_shape)  # A1111 accepts a Linear LoRA on a 1x1 conv and vice versa
    return delta * scale


def apply_kohya_lora(
    module_or_model: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, multiplier: float
) -> set[str]:
    """Add the LoRA in ``tensors`` whose keys start with ``prefix + '_'`` to ``module_or_model`` in place.

    Returns the keys used. Raises AssertionError on a key with that prefix that matches no layer, on an
    unknown key part, or when no key has the prefix at all.
    """
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        if not name.startswith(prefix + "_"):
            continue
        if part not in _PARTS:
            raise AssertionError(f"Unknown LoRA key part {part!r} in {key!r}")
        groups[name][part] = tensor
    if not groups:
        raise AssertionError(f"No LoRA keys start with {prefix}_")
    layers = layer_names(module_or_model, prefix)
    used: set[str] = set()
    with torch.no_grad():
        for name, parts in groups.items():
            layer = layers.get(name)
            if layer is None:
                raise AssertionError(f"LoRA layer {name!r} matches no layer of {type(module_or_model).__name__}")
            if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
                raise AssertionError(f"LoRA layer {name!r} lacks lora_down or lora_up")
            alpha = float(parts["alpha"].item()) if "alpha" in parts else None
            delta = lora_update(
                parts["lora_down.weight"], parts["lora_up.weight"], alpha, multiplier, layer.weight.shape
            )
            layer.weight += delta.to(layer.weight.dtype)
            used.update(f"{name}.{part}" for part in parts)
    return used


# ---------------------------------------------------------------------------------------------- other types
def a1111_update(parts: dict[str, torch.Tensor], weight: torch.Tensor, multiplier: float) -> torch.Tensor:
    """The delta A1111 1.10 adds to ``weight`` for one layer of a LoRA/LoCon, LoHa or LoKr file, with or without
    DoRA's ``dora_scale``, step by step as its ``network_lora/hada/lokr.py`` and ``network.py`` do it:
    the product, reshaped to the weight; times alpha / dim (dim = the rank of the low-rank pair; LoKr with both
    sides full: no scale); DoRA: merged weight times ``dora_scale`` over the merged weight's per-input-column
    norm (``transpose(0, 1)`` then the norm of each row), minus the weight; at last times the multiplier."""
    p = {k: v.float() for k, v in parts.items()}
    w = weight.float()
    dim: int | None
    if "lora_up.weight" in p:
        up, down = p["lora_up.weight"], p["lora_down.weight"]
        dim = down.shape[0]
        updown = up.reshape(up.shape[0], -1) @ down.reshape(dim, -1)
    elif "hada_w1_a" in p:
        dim = p["hada_w1_b"].shape[0]
        updown = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
    elif any(k.startswith("lokr_") for k in p):
        dim = None
        w1 = p.get("lokr_w1")
        if w1 is None:
            w1, dim = p["lokr_w1_a"] @ p["lokr_w1_b"], p["lokr_w1_b"].shape[0]
        w2 = p.get("lokr_w2")
        if w2 is None:
            w2, dim = p["lokr_w2_a"] @ p["lokr_w2_b"], p["lokr_w2_b"].shape[0]
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2)
    else:
        raise AssertionError(f"Not a layer A1111 reads: {sorted(p)}")
    if updown.numel() != w.numel():
        raise AssertionError(f"An update of {tuple(updown.shape)} does not fit {tuple(w.shape)}")
    updown = updown.reshape(w.shape)
    if "alpha" in p and dim is not None:
        updown = updown * (float(p["alpha"]) / dim)
    if "dora_scale" in p:
        merged = updown + w
        norm = (
            merged.transpose(0, 1)
            .reshape(merged.shape[1], -1)
            .norm(dim=1, keepdim=True)
            .reshape(merged.shape[1], *[1] * (w.dim() - 1))
            .transpose(0, 1)
        )
        updown = merged * (p["dora_scale"] / norm) - w
    return updown * multiplier


def comfyui_dora_update(parts: dict[str, torch.Tensor], weight: torch.Tensor, multiplier: float) -> torch.Tensor:
    """ComfyUI's (and Forge's) DoRA: the axis told by ``dora_scale``'s shape (first side equal to the weight's
    output side: per output row, else per input column), the norm plus the dtype's eps, the strength applied
    as ``W + strength * (W' - W)``."""
    p = {k: v.float() for k, v in parts.items() if k != "dora_scale"}
    w = weight.float()
    diff = a1111_update(p, w, 1.0)  # the plain update, scaled by alpha / dim, as ComfyUI computes it first
    calc = w + diff
    scale = parts["dora_scale"].float()
    if scale.shape[0] == w.shape[0]:
        norm = calc.reshape(w.shape[0], -1).norm(dim=1, keepdim=True).reshape(w.shape[0], *[1] * (w.dim() - 1))
    else:
        norm = (
            calc.transpose(0, 1)
            .reshape(calc.shape[1], -1)
            .norm(dim=1, keepdim=True)
            .reshape(calc.shape[1], *[1] * (w.dim() - 1))
            .transpose(0, 1)
        )
    calc = calc * (scale / (norm + torch.finfo(torch.float32).eps))
    return multiplier * (calc - w)
