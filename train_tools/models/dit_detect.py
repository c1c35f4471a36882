"""Telling the newer transformer ("DiT") families apart from their files' keys: FLUX.1 (dev, schnell), FLUX.2,
Chroma, SD3 / SD3.5 (Large, Medium), Z-Image and Qwen-Image.

The key patterns are those the public loaders (ComfyUI's model detection, diffusers' single-file utilities) use,
as ``../shared/reference/dit-families.md`` lists them. Training LoRAs for these families is not in this version
yet (issue 19); knowing the family lets the picker and Begin Train say so in a sentence instead of calling the
file "not a checkpoint".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Prefixes a transformer's keys may carry in a bundle or a WebUI-saved file.
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")


@dataclass(frozen=True)
class DitFamily:
    name: str  # e.g. "flux1-dev"
    title: str  # what the tab shows, e.g. "FLUX.1-dev"
    note: str = ""  # what a user needs to know besides (schnell's distillation, ...)


def _stripped(keys: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in keys.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value
    return out


def dit_family(keys: Mapping[str, Any]) -> DitFamily | None:
    """The DiT family of a file whose tensor names (and shapes, as values with ``.shape``) are ``keys``;
    None for anything else (a Stable Diffusion UNet, a LoRA, a VAE ...)."""
    sd = _stripped(keys)
    if "double_blocks.0.img_attn.norm.key_norm.scale" in sd and "img_in.weight" in sd:
        if "double_stream_modulation_img.lin.weight" in sd:
            return DitFamily("flux2", "FLUX.2")
        if any(k.startswith("distilled_guidance_layer.") for k in sd):
            return DitFamily("chroma", "Chroma")
        if any(k.startswith("guidance_in.") for k in sd):
            return DitFamily("flux1-dev", "FLUX.1-dev")
        return DitFamily(
            "flux1-schnell",
            "FLUX.1-schnell",
            "schnell is distilled: LoRAs train on a de-distilled base or with a training adapter",
        )
    if "joint_blocks.0.context_block.attn.qkv.weight" in sd:
        if any(k.endswith(".x_block.attn2.qkv.weight") for k in sd):
            return DitFamily("sd35-medium", "SD3.5 Medium")
        if any(k.endswith(".attn.ln_q.weight") for k in sd):
            return DitFamily("sd35-large", "SD3.5 Large")
        return DitFamily("sd3", "SD3 Medium")
    cap = sd.get("cap_embedder.1.weight")
    if cap is not None and int(getattr(cap, "shape", [0])[0]) == 3840:
        return DitFamily("zimage", "Z-Image")
    if "txt_norm.weight" in sd and any(k.startswith("transformer_blocks.") for k in sd):
        return DitFamily("qwen-image", "Qwen-Image")
    return None


__all__ = ["DitFamily", "dit_family"]
