"""Modules from a state dict: the tensors put into a module built on the meta device, checked for gaps.

Used by the loader for every part of a checkpoint and by the family detection for SD2's UNet probe; it sits
below both so that neither imports the other.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from .convert import match_model_keys


def instantiate(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    what: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Put ``state_dict``'s tensors into ``model`` (built with empty weights) and check nothing is missing.

    Tensors are moved/cast one at a time, in place in ``state_dict``, so each of the file's tensors is freed
    as soon as its copy exists and the model never exists twice in memory (and diffusers'
    ``ModelMixin.to(dtype=...)``, which warns on every call, is not needed).
    """
    if device is not None or dtype is not None:
        for key in list(state_dict):
            tensor = state_dict[key]
            state_dict[key] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
            del tensor
    state_dict = match_model_keys(state_dict, model)
    try:
        result = model.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()[:200]
        raise UserError(
            f"The checkpoint's {what} weights do not fit the expected architecture ({first}); "
            "use a standard Stable Diffusion checkpoint."
        ) from exc
    # position_ids is a buffer some transformers versions save and others do not; it is always rebuilt.
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{what}: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    still_empty = [n for n, p in model.named_parameters() if p.is_meta]
    if still_empty:
        raise ValueError(f"{what}: parameters left without weights: {still_empty[:5]}")
    if device is not None:
        model.to(device)  # the buffers that are not in a state dict (e.g. position ids)
    return model.eval()
