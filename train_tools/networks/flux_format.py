"""FLUX.1 LoRA files in kohya's layout, the one ComfyUI, Forge, Forge Neo and diffusers all read
(``../shared/reference/dit-families.md``): ``lora_unet_double_blocks_<i>_<part>`` and
``lora_unet_single_blocks_<i>_<part>`` with ``lora_down.weight``, ``lora_up.weight`` and ``alpha``, in the names
of Black Forest Labs' own model, from a network trained on diffusers' ``FluxTransformer2DModel``.

The two models cut some layers differently: BFL's ``img_attn.qkv`` is diffusers' ``to_q``, ``to_k`` and
``to_v``, and a single block's ``linear1`` is ``to_q``, ``to_k``, ``to_v`` and ``proj_mlp`` end to end. Such a
layer is written as one LoRA of the parts side by side (kohya's split_qkv does the same): the down matrices
stacked, the up matrices on the diagonal, so the host's ``up @ down * alpha / rank`` gives each part its own
update; with n parts of rank r the file's rank is n * r, so its alpha is n times the parts' to keep the scale.
Written here because no library writes this layout: diffusers and peft only read it.

The default targets are kohya's: every Linear of the double and single blocks, modulation included.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .lora import lora_tensors

UNET = "lora_unet"

# diffusers' name inside a block -> (BFL's name, the part's place in it) for the double and the single blocks.
_DOUBLE = {
    "norm1.linear": ("img_mod_lin", 0),
    "norm1_context.linear": ("txt_mod_lin", 0),
    "attn.to_q": ("img_attn_qkv", 0),
    "attn.to_k": ("img_attn_qkv", 1),
    "attn.to_v": ("img_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", 0),
    "attn.add_q_proj": ("txt_attn_qkv", 0),
    "attn.add_k_proj": ("txt_attn_qkv", 1),
    "attn.add_v_proj": ("txt_attn_qkv", 2),
    "attn.to_add_out": ("txt_attn_proj", 0),
    "ff.net.0.proj": ("img_mlp_0", 0),
    "ff.net.2": ("img_mlp_2", 0),
    "ff_context.net.0.proj": ("txt_mlp_0", 0),
    "ff_context.net.2": ("txt_mlp_2", 0),
}
_SINGLE = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", 0),
    "norm.linear": ("modulation_lin", 0),
}
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def flux_target_modules(transformer: nn.Module) -> list[str]:
    """kohya's default FLUX.1 targets: every Linear of the double and single blocks, in model order."""
    targets = []
    for name, module in transformer.named_modules():
        found = _BLOCK.match(name)
        if found is None or not isinstance(module, nn.Linear):
            continue
        table = _DOUBLE if found.group(1) == "transformer_blocks" else _SINGLE
        if found.group(3) in table:
            targets.append(name)
    if not targets:
        raise ValueError(f"No FLUX.1 blocks found in {type(transformer).__name__}; is it a FluxTransformer2DModel?")
    return targets


def bfl_name(path: str) -> tuple[str, int]:
    """(the file's layer name, the part's place in it) of a diffusers module path of a FLUX.1 block."""
    found = _BLOCK.match(path)
    if found is None:
        raise ValueError(f"{path!r} is not in a FLUX.1 double or single block.")
    kind, index, inner = found.groups()
    double = kind == "transformer_blocks"
    part, place = (_DOUBLE if double else _SINGLE)[inner]
    return f"{UNET}_{'double' if double else 'single'}_blocks_{index}_{part}", place


def flux_kohya_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA of an adapted FLUX.1 transformer as kohya's file tensors (detached CPU copies)."""
    layers: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for path, module in transformer.named_modules():
        tensors = lora_tensors(module)
        if tensors is None:
            continue
        name, place = bfl_name(path)
        layers.setdefault(name, {})[place] = tensors
    if not layers:
        raise ValueError("The transformer has no LoRA layers.")
    out: dict[str, torch.Tensor] = {}
    for name, parts in layers.items():
        ordered = [parts[i] for i in sorted(parts)]
        if sorted(parts) != list(range(len(parts))):
            raise ValueError(f"{name}: some of its parts have no LoRA ({sorted(parts)}); train all or none of them.")
        alphas = {float(p["alpha"]) for p in ordered}
        ranks = {int(p["lora_down.weight"].shape[0]) for p in ordered}
        if len(alphas) > 1 or len(ranks) > 1:
            raise ValueError(f"{name}: its parts have different dims or alphas; they are written as one LoRA.")
        down = torch.cat([p["lora_down.weight"].detach() for p in ordered], dim=0)
        up = torch.block_diag(*[p["lora_up.weight"].detach() for p in ordered])
        out[f"{name}.lora_down.weight"] = down.to("cpu", copy=True)
        out[f"{name}.lora_up.weight"] = up.to("cpu", copy=True)
        out[f"{name}.alpha"] = torch.tensor(alphas.pop() * len(ordered), dtype=torch.float32)
    return out


__all__ = ["bfl_name", "flux_kohya_state_dict", "flux_target_modules"]
