"""Which layers of a Stable Diffusion model get a network (LoRA or any other type), by their module paths.

The layer choice is the kohya "LoRA" (LierLa) set that every WebUI maps, optionally widened by the "LoCon"
(C3Lier) convolutions; see the LoRA file format reference. Every network type uses the same layers.
"""

from __future__ import annotations

import re

from torch import nn

# Classes are matched by name, not isinstance: diffusers moved them between modules over the versions the
# hosts pin (e.g. Downsample2D left diffusers.models.resnet), while their names and children stayed put.
_TRANSFORMER_CLASSES = frozenset({"Transformer2DModel"})
_CONV_BLOCK_CLASSES = frozenset({"ResnetBlock2D", "Downsample2D", "Upsample2D"})

# Inside a Transformer2DModel: projections, both attentions and the feed-forward (kohya's LierLa list).
_TRANSFORMER_CHILD = re.compile(
    r"proj_in|proj_out|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)"
)
# Inside a ResnetBlock2D / Downsample2D / Upsample2D: the LoCon list.
_CONV_BLOCK_CHILD = re.compile(r"conv1|conv2|conv|time_emb_proj|conv_shortcut")
# Inside every CLIP encoder layer.
_TEXT_LAYER_CHILD = re.compile(r"self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12]")


def unet_target_modules(unet: nn.Module, conv: bool = False) -> list[str]:
    """Full module paths of the UNet layers that get a LoRA, in model order.

    Default: in every Transformer2DModel, ``attn1``/``attn2`` ``to_q``, ``to_k``, ``to_v``, ``to_out.0``,
    ``ff.net.0.proj``, ``ff.net.2``, ``proj_in``, ``proj_out`` (SD1.5: 192 layers, SDXL: 722). With
    ``conv=True`` also the LoCon layers: ``conv1``, ``conv2``, ``time_emb_proj``, ``conv_shortcut`` of every
    ResnetBlock2D and the ``conv`` of every Downsample2D/Upsample2D. ``conv_in``, ``conv_out`` and
    ``time_embedding`` are never adapted (no WebUI maps them).
    """
    targets: list[str] = []
    seen: set[str] = set()
    for name, module in unet.named_modules():
        cls = type(module).__name__
        if cls in _TRANSFORMER_CLASSES:
            pattern = _TRANSFORMER_CHILD
        elif conv and cls in _CONV_BLOCK_CLASSES:
            pattern = _CONV_BLOCK_CHILD
        else:
            continue
        for child_name, child in module.named_modules():
            if not child_name or not pattern.fullmatch(child_name):
                continue
            if not isinstance(child, (nn.Linear, nn.Conv2d)):
                continue
            path = f"{name}.{child_name}" if name else child_name
            if path not in seen:
                seen.add(path)
                targets.append(path)
    if not targets:
        raise ValueError(f"No LoRA target layers found in {type(unet).__name__}; is it a diffusers UNet?")
    return targets


def text_encoder_target_modules(te: nn.Module) -> list[str]:
    """Full module paths of the text-encoder layers that get a LoRA, in model order.

    ``self_attn.q_proj``/``k_proj``/``v_proj``/``out_proj`` and ``mlp.fc1``/``mlp.fc2`` of every encoder layer
    (CLIP-L: 72 layers, OpenCLIP-bigG: 192), named as in transformers' ``CLIPTextModel``
    (``text_model.encoder.layers.0.self_attn.q_proj``).
    """
    targets: list[str] = []
    for name, module in te.named_modules():
        if not (name == "encoder.layers" or name.endswith(".encoder.layers")):
            continue
        if not isinstance(module, nn.ModuleList):
            continue
        for index, layer in enumerate(module):
            for child_name, child in layer.named_modules():
                if child_name and _TEXT_LAYER_CHILD.fullmatch(child_name) and isinstance(child, nn.Linear):
                    targets.append(f"{name}.{index}.{child_name}")
    if not targets:
        raise ValueError(f"No LoRA target layers found in {type(te).__name__}; is it a CLIP text model?")
    return targets


# peft matches rank/alpha pattern keys as a suffix after a '.', and older peft (0.13, Forge) requires that
# dot: a full top-level path such as "down_blocks.0.resnets.0.conv1" would never match there. A structural
# suffix of the 3x3 convolutions of a SD UNet matches on every version; attach_lora verifies the result.
CONV3X3_PATTERN = r"(?:resnets\.\d+\.conv[12]|(?:down|up)samplers\.\d+\.conv)"


def is_conv3x3(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


__all__ = ["CONV3X3_PATTERN", "is_conv3x3", "text_encoder_target_modules", "unet_target_modules"]
