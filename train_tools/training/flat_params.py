"""The LoRA weights of a param group as views of one contiguous tensor, and their gradients too.

Why this exists (none of the stack does it outside FSDP/DeepSpeed sharding): a LoRA is hundreds of small
tensors (96 on the demo model, 384+ on SD1.5), and every whole-model pass over them outside the UNet (the
gradient norm, the clipping, the optimizer's update, zeroing) is one small op per tensor, or one foreach call
that on a CPU still runs its tensors one by one on one thread. With the weights and gradients laid out end to
end, each of those passes is one op over one tensor: vectorised, multi-threaded on a CPU, one launch on a GPU.
Measured on the demo model at rank 128 (688 K weights, cold caches as after a backward, 2-core AMD EPYC): a
Lion update 1.38 -> 0.49 ms, the gradient norm 0.36 -> 0.10 ms.

How: every LoRA weight keeps its own ``nn.Parameter`` (so peft, the saved file, DDP's hooks and resuming see
the same model), but its ``.data`` becomes a view of the group's flat tensor and its ``.grad`` a view of the
flat gradient. Autograd adds each new gradient into an existing ``.grad`` in place, so backward fills the flat
gradient; the optimizer is handed the one flat parameter, whose updates the views see. The flat gradient must
be zeroed in place (``zero_grad(set_to_none=False)``), never set to None, or the views would detach from it.

Only for optimizers whose update is elementwise (the same numbers for one tensor as for many): Lion, AdamW
and SGD. Adafactor factors by each weight's shape; the 8-bit ones quantise per block and keep small tensors
in 32 bits; Prodigy is left as its authors ship it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

ELEMENTWISE_OPTIMIZERS = ("Lion", "AdamW", "SGDNesterov")


class FlatParameter(torch.nn.Parameter):
    """One group's trainable weights end to end; ``views`` are the model's parameters that live in it."""

    views: list[torch.nn.Parameter]


def flatten_group(params: list[torch.nn.Parameter]) -> FlatParameter:
    """Move ``params`` (trainable, one device and dtype) into one new flat parameter; return it.

    Their values are unchanged; afterwards ``p.data`` and ``p.grad`` of each are views of the flat weights
    and of the flat gradient (zeros), in the order given.
    """
    if not params:
        raise ValueError("flatten_group needs at least one parameter.")
    first = params[0]
    if any(p.device != first.device or p.dtype != first.dtype for p in params):
        raise ValueError("The weights of one flat group must share one device and dtype.")
    if any(not p.requires_grad for p in params):
        raise ValueError("Only trainable weights can be flattened.")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("A weight is listed twice.")
    total = sum(p.numel() for p in params)
    with torch.no_grad():
        data = torch.cat([p.detach().reshape(-1) for p in params]) if total else first.new_empty(0)
    flat = FlatParameter(data, requires_grad=True)
    flat.grad = torch.zeros_like(data)
    flat.views = list(params)
    offset = 0
    for p in params:
        n = p.numel()
        p.data = data[offset : offset + n].view(p.shape)
        p.grad = flat.grad[offset : offset + n].view(p.shape)
        offset += n
    return flat


def flatten_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same param groups (learning rates and other keys kept), each with its trainable weights moved
    into one flat parameter per device and dtype. Frozen weights are left out, as an optimizer skips them."""
    flat_groups = []
    for group in groups:
        buckets: dict[tuple[torch.device, torch.dtype], list[torch.nn.Parameter]] = {}
        for p in group["params"]:
            if p.requires_grad:
                buckets.setdefault((p.device, p.dtype), []).append(p)
        flats = [flatten_group(ps) for ps in buckets.values()]
        flat_groups.append({**group, "params": flats})
    n_views = sum(len(f.views) for g in flat_groups for f in g["params"])
    log.debug("Laid %d LoRA tensors out in %d contiguous tensors.", n_views, sum(len(g["params"]) for g in flat_groups))
    return flat_groups


def views_intact(flat: FlatParameter) -> bool:
    """Whether every view still shares the flat weights and the flat gradient (a ``.to()`` that copied a
    weight, or a ``.grad = None``, would silently stop it from training)."""
    if flat.grad is None:
        return False
    data_ptr, grad_ptr = flat.untyped_storage().data_ptr(), flat.grad.untyped_storage().data_ptr()
    return all(
        p.untyped_storage().data_ptr() == data_ptr
        and p.grad is not None
        and p.grad.untyped_storage().data_ptr() == grad_ptr
        for p in flat.views
    )
