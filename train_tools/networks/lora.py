"""Which layers of a Stable Diffusion model get a LoRA, and attaching that LoRA with peft.

The layer choice is the kohya "LoRA" (LierLa) set that every WebUI maps, optionally widened by the "LoCon"
(C3Lier) convolutions; see the LoRA file format reference. The adapter itself is plain peft
(``inject_adapter_in_model``): it works the same on a diffusers UNet and on a transformers CLIP text model,
and on every peft version the WebUI hosts ship (Forge pins 0.13).

Precision: peft casts a new adapter to the dtype of the layer it wraps, so on an fp16/bf16 base the adapter
would start in fp16/bf16. ``attach_lora`` casts it back to float32. That is safe: peft's LoRA forward casts
the layer input to the adapter's dtype, runs the adapter in float32 and casts the sum back to the base
layer's dtype, so float32 LoRA weights train (and their optimizer state lives) in float32 on a half-precision
base, with or without autocast.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

log = logging.getLogger(__name__)

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

# peft matches rank/alpha pattern keys as a suffix after a '.', and older peft (0.13, Forge) requires that
# dot: a full top-level path such as "down_blocks.0.resnets.0.conv1" would never match there. A structural
# suffix of the 3x3 convolutions of a SD UNet matches on every version; attach_lora verifies the result.
_CONV3X3_PATTERN = r"(?:resnets\.\d+\.conv[12]|(?:down|up)samplers\.\d+\.conv)"


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


def attach_lora(
    model: nn.Module,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    adapter_name: str = "default",
) -> nn.Module:
    """Inject a LoRA adapter into exactly ``targets`` of ``model`` (in place) and return ``model``.

    A is kaiming-uniform and B zero (peft's default, the same start as kohya), so the model's output is
    unchanged until training moves B. The adapter's scale is ``alpha / rank`` (no rsLoRA), which is what
    the file's ``alpha`` means to every WebUI. 3x3 convolutions (LoCon) use ``conv_rank``/``conv_alpha`` when
    given (``conv_alpha`` defaults to 1, as in kohya); 1x1 convolutions and Linear layers use ``rank``.
    The base model is frozen; the LoRA parameters are float32 and trainable.
    """
    targets = list(dict.fromkeys(targets))
    if not targets:
        raise ValueError("attach_lora needs at least one target module.")
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}.")
    modules = dict(model.named_modules())
    missing = [t for t in targets if t not in modules]
    if missing:
        raise ValueError(f"{len(missing)} target modules are not in the model, e.g. {missing[0]!r}.")
    already = [t for t in targets if isinstance(modules[t], LoraLayer)]
    if already:
        raise ValueError(f"{already[0]!r} already has a LoRA; attach a LoRA only once per model.")

    conv3x3 = {t for t in targets if _is_conv3x3(modules[t])}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    if conv_rank is not None and conv3x3:
        rank_pattern[_CONV3X3_PATTERN] = int(conv_rank)
        alpha_pattern[_CONV3X3_PATTERN] = float(1.0 if conv_alpha is None else conv_alpha)

    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha),
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,
        use_rslora=False,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=adapter_name)

    injected = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.r}
    if set(injected) != set(targets):
        raise RuntimeError(f"peft adapted {len(injected)} layers but {len(targets)} were requested.")
    if rank_pattern:
        wrong = [t for t in conv3x3 if injected[t].r[adapter_name] != rank_pattern[_CONV3X3_PATTERN]]
        if wrong:
            raise RuntimeError(f"The LoCon rank was not applied to {wrong[0]!r}.")

    for param in lora_parameters(model, adapter_name):
        param.data = param.data.float()
        param.requires_grad_(True)
    log.info("Attached LoRA (rank %d, alpha %g) to %d layers of %s.", rank, alpha, len(targets), type(model).__name__)
    return model


def lora_parameters(model: nn.Module, adapter_name: str = "default") -> list[nn.Parameter]:
    """The LoRA A and B weights of ``adapter_name`` in ``model``, in model order (what the optimizer trains)."""
    params: list[nn.Parameter] = []
    for module in model.modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        params.extend(module.lora_A[adapter_name].parameters())
        params.extend(module.lora_B[adapter_name].parameters())
    return params


def _is_conv3x3(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


__all__ = ["attach_lora", "lora_parameters", "text_encoder_target_modules", "unet_target_modules"]
