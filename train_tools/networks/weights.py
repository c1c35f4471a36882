"""What a host adds to a layer's weight for one layer of a network file, by the published formulas of each type
(A1111 1.10's ``extensions-builtin/Lora/network_*.py``, ComfyUI's ``weight_adapter``, Forge's patcher; see the
LoRA file format reference). The standalone previewer merges files with it.

- LoRA / LoCon: ``up @ down`` (a conv's ``down`` keeps its kernel, its ``up`` is 1x1), scale alpha / rank.
- LoHa: ``(w1_a @ w1_b) * (w2_a @ w2_b)``, scale alpha / rank.
- LoKr: ``kron(w1, w2)`` with either side full or ``_a @ _b``; scale alpha / rank of the low-rank side, 1 when
  both are full.
- DoRA (``dora_scale`` beside any of them): ``W' = (W + delta) * dora_scale / ||W + delta||`` with the norm over
  the axis the scale's shape names (``(1, in, ...)``: each input column; ``(out, 1, ...)``: each output row).
- The multiplier m: ``W + m * delta`` (DoRA: ``W + m * (W' - W)``).
Tucker forms (``hada_t1``, ``lokr_t2``) are not read: nothing here writes them.
"""

from __future__ import annotations

import torch

LORA_PARTS = frozenset({"lora_down.weight", "lora_up.weight"})
LOHA_PARTS = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
LOKR_SIDES = ("w1", "w2")


def layer_kind(parts: dict[str, torch.Tensor]) -> str | None:
    """ "lora", "loha" or "lokr" by the tensor names of one layer, or None when they are none of these."""
    names = set(parts)
    if names >= LORA_PARTS:
        return "lora"
    if names >= LOHA_PARTS and not names & {"hada_t1", "hada_t2"}:
        return "loha"
    if "lokr_t2" not in names and all(
        f"lokr_{side}" in names or {f"lokr_{side}_a", f"lokr_{side}_b"} <= names for side in LOKR_SIDES
    ):
        return "lokr"
    return None


def weight_update(parts: dict[str, torch.Tensor], weight: torch.Tensor, multiplier: float) -> torch.Tensor:
    """The float32 tensor a host adds to ``weight`` for the layer ``parts`` (the tensors after the layer's name
    and its first '.') at ``multiplier``. A layer that does not fit ``weight`` raises ValueError."""
    kind = layer_kind(parts)
    if kind is None:
        raise ValueError(f"Unknown network layer parts {sorted(parts)}.")
    original = weight.float()
    product, dim = _product(kind, {k: v.float() for k, v in parts.items()})
    if product.numel() != original.numel():
        raise ValueError(f"An update of {tuple(product.shape)} does not fit a weight of {tuple(original.shape)}.")
    alpha = float(parts["alpha"].item()) if "alpha" in parts else None
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    delta = product.reshape(original.shape) * scale
    if "dora_scale" in parts:
        delta = _decomposed(original, delta, parts["dora_scale"].float()) - original
    return delta * float(multiplier)


def _product(kind: str, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int | None]:
    """The unscaled update and the dim its alpha divides by (None: no scale)."""
    if kind == "lora":
        down, up = p["lora_down.weight"], p["lora_up.weight"]
        return up.flatten(1) @ down.flatten(1), down.shape[0]
    if kind == "loha":
        w1 = p["hada_w1_a"] @ p["hada_w1_b"]
        return w1 * (p["hada_w2_a"] @ p["hada_w2_b"]), p["hada_w1_b"].shape[0]
    dim = None
    sides = []
    for side in LOKR_SIDES:
        if f"lokr_{side}" in p:
            sides.append(p[f"lokr_{side}"])
        else:
            sides.append(p[f"lokr_{side}_a"] @ p[f"lokr_{side}_b"])
            dim = p[f"lokr_{side}_b"].shape[0]
    w1, w2 = sides
    if w2.dim() == 4:  # a conv's full w2 keeps its kernel
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2), dim


def _decomposed(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    merged = weight + delta
    rest = [1] * (weight.dim() - 1)
    if dora_scale.shape[0] == weight.shape[0] and weight.shape[0] != 1:  # each output row
        norm = merged.flatten(1).norm(dim=1).reshape(-1, *rest)
    else:  # each input column (A1111's axis)
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *rest[1:])
    return merged * (dora_scale.reshape(norm.shape) / norm)


__all__ = ["layer_kind", "weight_update"]
