"""Key conversion between the original single-file layout and diffusers/transformers state dicts.

Why by hand: diffusers ships no diffusers -> original converter in its package, and its original -> diffusers
helpers are private and change between the versions the WebUI hosts pin. So this module holds ONE mapping,
built per architecture from the diffusers/transformers key names (enumerated from a meta-device model, so no
memory is used), and both directions are derived from it: they can never disagree.

The mapping is a list of entries, one per tensor of the original file:

* ``copy``: same tensor, other name;
* ``conv1x1``: a Linear weight (out, in) in diffusers, a 1x1 conv (out, in, 1, 1) in the original
  (the VAE mid-block attention);
* ``transpose``: OpenCLIP's ``text_projection`` is applied as ``x @ P`` (hidden, proj); transformers has a
  Linear weight (proj, hidden);
* ``fused``: OpenCLIP's ``attn.in_proj_weight``/``bias`` is q, k and v concatenated on dim 0.

Rules are generic over the number of blocks and layers, so the tiny test models use the same code path.
Text encoder keys on the diffusers side use the transformers 4.x names (``text_model.…``): the WebUI hosts'
transformers has them, and transformers 5 (which dropped the ``text_model`` wrapper of ``CLIPTextModel``)
is handled by ``normalize_text_encoder_keys``/``match_model_keys``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError
from .configs import (
    UNET_PREFIX,
    VAE_PREFIX,
    ModelSpec,
    TextEncoderSpec,
    build_text_encoder,
    build_unet,
    build_vae,
)

log = logging.getLogger(__name__)

COPY, CONV1X1, TRANSPOSE, FUSED = "copy", "conv1x1", "transpose", "fused"
TEXT_MODEL = "text_model."


@dataclass
class ComponentStateDicts:
    """State dicts in diffusers/transformers naming; text encoders in the spec's order."""

    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    text_encoders: list[dict[str, torch.Tensor]] = field(default_factory=list)


@dataclass(frozen=True)
class Entry:
    """One tensor of the original file and the diffusers tensor(s) it is made of."""

    original: str
    diffusers: tuple[str, ...]
    kind: str = COPY


@dataclass(frozen=True)
class ComponentMap:
    component: str  # "unet", "vae", "te0", "te1"
    entries: tuple[Entry, ...]


# ---------------------------------------------------------------------------------------------- UNet rules
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _rename_first(rest: str, table: dict[str, str]) -> str:
    """Rename the leading module of ``rest`` (``norm1.weight`` -> ``in_layers.0.weight``)."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    raise KeyError(rest)


def _unet_rule(config: dict) -> Callable[[str], tuple[str, str, int]]:
    lpb = int(config["layers_per_block"])
    per_level = lpb + 1  # resnets (+ attentions) of one level, plus its down- or upsampler
    up_has_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]

    def rule(key: str) -> tuple[str, str, int]:
        for old, new in _UNET_TOP.items():
            if key.startswith(old + "."):
                return new + key[len(old) :], COPY, 0
        if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = 1 + level * per_level + j
            if kind == "resnets":
                return f"input_blocks.{index}.0.{_rename_first(rest, _UNET_RESNET)}", COPY, 0
            return f"input_blocks.{index}.1.{rest}", COPY, 0
        if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            return f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}", COPY, 0
        if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = level * per_level + j
            if kind == "resnets":
                return f"output_blocks.{index}.0.{_rename_first(rest, _UNET_RESNET)}", COPY, 0
            return f"output_blocks.{index}.1.{rest}", COPY, 0
        if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            level = int(m[1])
            slot = 2 if up_has_attn[level] else 1
            return f"output_blocks.{level * per_level + lpb}.{slot}.{m[2]}", COPY, 0
        if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", key):
            return f"middle_block.{0 if m[1] == '0' else 2}.{_rename_first(m[2], _UNET_RESNET)}", COPY, 0
        if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            return f"middle_block.1.{m[1]}", COPY, 0
        raise KeyError(key)

    return rule


# ---------------------------------------------------------------------------------------------- VAE rules
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_rule(config: dict) -> Callable[[str], tuple[str, str, int]]:
    levels = len(config["block_out_channels"])

    def rule(key: str) -> tuple[str, str, int]:
        if re.fullmatch(r"(quant_conv|post_quant_conv|(encoder|decoder)\.conv_(in|out))\.\w+", key):
            return key, COPY, 0
        if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(\w+)", key):
            return f"{m[1]}.norm_out.{m[2]}", COPY, 0
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            return f"encoder.down.{m[1]}.block.{m[2]}.{_rename_first(m[3], _VAE_RESNET)}", COPY, 0
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", COPY, 0
        # The original numbers decoder levels from the lowest resolution up; diffusers from the top down.
        if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            level = levels - 1 - int(m[1])
            return f"decoder.up.{level}.block.{m[2]}.{_rename_first(m[3], _VAE_RESNET)}", COPY, 0
        if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}", COPY, 0
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key):
            return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename_first(m[3], _VAE_RESNET)}", COPY, 0
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            name = _VAE_ATTN[m[2]]
            kind = CONV1X1 if m[3] == "weight" and name != "norm" else COPY
            return f"{m[1]}.mid.attn_1.{name}.{m[3]}", kind, 0
        raise KeyError(key)

    return rule


# ---------------------------------------------------------------------------------------------- text rules
_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def _hf_text_rule(key: str) -> tuple[str, str, int]:
    return key, COPY, 0


def _openclip_rule(key: str) -> tuple[str, str, int]:
    if key == "text_projection.weight":
        return "text_projection", TRANSPOSE, 0
    if key == "text_model.embeddings.token_embedding.weight":
        return "token_embedding.weight", COPY, 0
    if key == "text_model.embeddings.position_embedding.weight":
        return "positional_embedding", COPY, 0
    if m := re.fullmatch(r"text_model\.final_layer_norm\.(\w+)", key):
        return f"ln_final.{m[1]}", COPY, 0
    if m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv]_proj)\.(weight|bias)", key):
        return f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", FUSED, _QKV[m[2]]
    if m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key):
        return f"transformer.resblocks.{m[1]}.{_rename_first(m[2], _OPENCLIP_LAYER)}", COPY, 0
    raise KeyError(key)


# ---------------------------------------------------------------------------------------------- the map
def normalize_text_encoder_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 4.x names for a CLIP text encoder state dict: ``text_model.`` in front of every key but
    the projection. Buffers that are not weights (``position_ids``) are dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith(TEXT_MODEL) and not key.startswith("text_projection."):
            key = TEXT_MODEL + key
        out[key] = value
    return out


def match_model_keys(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename canonical text encoder keys to what ``model`` uses (with or without the ``text_model.`` wrapper)."""
    expected = set(model.state_dict().keys())
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key not in expected and key.startswith(TEXT_MODEL) and key[len(TEXT_MODEL) :] in expected:
            key = key[len(TEXT_MODEL) :]
        out[key] = value
    return out


def _build_map(
    component: str, keys: Iterable[str], rule: Callable[[str], tuple[str, str, int]], prefix: str
) -> ComponentMap:
    grouped: dict[str, dict[int, str]] = {}
    kinds: dict[str, str] = {}
    for key in keys:
        try:
            original, kind, slot = rule(key)
        except KeyError:
            raise ValueError(f"No original-layout name for {component} key {key!r}.") from None
        original = prefix + original
        if slot in grouped.setdefault(original, {}):
            raise ValueError(f"Two {component} keys map to {original!r}.")
        grouped[original][slot] = key
        kinds[original] = kind
    entries = []
    for original, slots in grouped.items():
        parts = tuple(slots[i] for i in sorted(slots))
        if kinds[original] == FUSED and sorted(slots) != [0, 1, 2]:
            raise ValueError(f"{original!r} needs q, k and v; got {parts}.")
        entries.append(Entry(original, parts, kinds[original]))
    return ComponentMap(component, tuple(entries))


_MAP_CACHE: dict[str, list[ComponentMap]] = {}


def _text_keys(te: TextEncoderSpec) -> list[str]:
    model = build_text_encoder(te, empty=True)
    return list(normalize_text_encoder_keys(model.state_dict()).keys())


def key_map(spec: ModelSpec) -> list[ComponentMap]:
    """The mapping for ``spec``: UNet, VAE, then each text encoder (cached per architecture)."""
    cache_key = json.dumps(
        [spec.unet, spec.vae, [(t.config, t.layout, t.prefix, t.with_projection) for t in spec.text_encoders]],
        sort_keys=True,
    )
    if cache_key not in _MAP_CACHE:
        # The diffusers key names come from meta-device models: exact for the installed diffusers version,
        # and free of memory even for SDXL.
        unet_keys = build_unet(spec, empty=True).state_dict().keys()
        vae_keys = build_vae(spec, empty=True).state_dict().keys()
        maps = [
            _build_map("unet", unet_keys, _unet_rule(spec.unet), UNET_PREFIX),
            _build_map("vae", vae_keys, _vae_rule(spec.vae), VAE_PREFIX),
        ]
        for i, te in enumerate(spec.text_encoders):
            rule = _openclip_rule if te.layout == "openclip" else _hf_text_rule
            maps.append(_build_map(f"te{i}", _text_keys(te), rule, te.prefix))
        _MAP_CACHE[cache_key] = maps
    return _MAP_CACHE[cache_key]


# ---------------------------------------------------------------------------------------------- tensors
def _to_original(entry: Entry, tensors: list[torch.Tensor]) -> torch.Tensor:
    if entry.kind == FUSED:
        return torch.cat(tensors, dim=0)
    (tensor,) = tensors
    if entry.kind == CONV1X1:
        return tensor.reshape(*tensor.shape, 1, 1) if tensor.ndim == 2 else tensor
    if entry.kind == TRANSPOSE:
        return tensor.t().contiguous()
    return tensor


def _to_diffusers(entry: Entry, tensor: torch.Tensor) -> list[torch.Tensor]:
    if entry.kind == FUSED:
        if tensor.shape[0] % 3:
            raise UserError(
                f"The checkpoint's {entry.original} cannot be split into q, k and v; the file is "
                "damaged or not a Stable Diffusion checkpoint."
            )
        return list(tensor.chunk(3, dim=0))
    if entry.kind == CONV1X1:
        # Some re-saved checkpoints already hold these as (out, in); both are accepted.
        return [tensor.reshape(tensor.shape[0], -1)]
    if entry.kind == TRANSPOSE:
        return [tensor.t().contiguous()]
    return [tensor]


def original_to_diffusers(sd: dict[str, torch.Tensor], spec: ModelSpec) -> ComponentStateDicts:
    """Split a single-file state dict into diffusers/transformers state dicts for ``spec``.

    Keys the architecture does not use (EMA copies, ``alphas_cumprod``, the unused last OpenCLIP layer of
    SD2, ``logit_scale``, ...) are logged at debug level and ignored. Missing weights raise a UserError.
    """
    sd = _with_text_model_names(sd, spec)
    used: set[str] = set()
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for cmap in key_map(spec):
        out: dict[str, torch.Tensor] = {}
        missing = [e.original for e in cmap.entries if e.original not in sd]
        if missing:
            raise UserError(
                f"The checkpoint lacks {len(missing)} {_describe(cmap.component)} weights "
                f"(e.g. {missing[0]}); it is damaged or not a full {spec.family.upper()} "
                "checkpoint, so use a complete one."
            )
        for entry in cmap.entries:
            used.add(entry.original)
            for name, tensor in zip(entry.diffusers, _to_diffusers(entry, sd[entry.original]), strict=False):
                out[name] = tensor
        parts[cmap.component] = out
    leftover = [k for k in sd if k not in used]
    if leftover:
        log.debug(
            "Ignoring %d checkpoint keys the %s model does not use, e.g. %s",
            len(leftover),
            spec.name,
            ", ".join(leftover[:5]),
        )
    tes = [parts[f"te{i}"] for i in range(len(spec.text_encoders))]
    return ComponentStateDicts(parts["unet"], parts["vae"], tes)


def _with_text_model_names(sd: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Some SD1 files were saved with an old transformers that had no ``text_model`` level
    (``cond_stage_model.transformer.encoder.…``); the WebUI renames those keys on load, and so do we."""
    renames: dict[str, str] = {}
    for te in spec.text_encoders:
        if te.layout != "hf":
            continue
        for key in sd:
            if key.startswith(te.prefix) and key[len(te.prefix) :].startswith(
                ("embeddings.", "encoder.", "final_layer_norm.")
            ):
                renames[key] = te.prefix + TEXT_MODEL + key[len(te.prefix) :]
    if not renames:
        return sd
    log.debug("Renaming %d text encoder keys saved without 'text_model.'", len(renames))
    return {renames.get(k, k): v for k, v in sd.items()}


def diffusers_to_original(components: ComponentStateDicts, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """One single-file state dict (the layout A1111/Forge/ComfyUI load) from diffusers/transformers dicts.

    Tensors are shared with the input where the layout allows (no copies); make them contiguous before
    ``safetensors.torch.save_file``, which requires it.
    """
    sources = {"unet": components.unet, "vae": components.vae}
    if len(components.text_encoders) != len(spec.text_encoders):
        raise ValueError(
            f"A {spec.family} model has {len(spec.text_encoders)} text encoder(s), got {len(components.text_encoders)}."
        )
    for i, te_sd in enumerate(components.text_encoders):
        sources[f"te{i}"] = normalize_text_encoder_keys(te_sd)
    out: dict[str, torch.Tensor] = {}
    for cmap in key_map(spec):
        source = sources[cmap.component]
        for entry in cmap.entries:
            try:
                tensors = [source[name] for name in entry.diffusers]
            except KeyError as exc:
                raise ValueError(f"The {cmap.component} state dict lacks {exc.args[0]!r}.") from None
            out[entry.original] = _to_original(entry, tensors)
        extra = set(source) - {n for e in cmap.entries for n in e.diffusers}
        if extra:
            log.debug("Not written (%s): %s", cmap.component, ", ".join(sorted(extra)[:5]))
    for te_spec, te_sd in zip(spec.text_encoders, components.text_encoders, strict=False):
        key = f"{te_spec.prefix}text_projection"
        if te_spec.layout == "openclip" and key not in out:
            # Every real SD2 file carries OpenCLIP's projection although SD never applies it (it conditions on
            # the hidden states). Readers size the attention split from it (diffusers 0.31 falls back to a
            # wrong 512 without it), so a written file has one: the identity, which changes nothing.
            width = next(t for n, t in te_sd.items() if n.endswith("final_layer_norm.weight")).shape[0]
            out[key] = torch.eye(width)
    return out


def components_from_models(unet: nn.Module, vae: nn.Module, text_encoders: list[nn.Module]) -> ComponentStateDicts:
    """The state dicts of live diffusers/transformers modules (tensors shared, not copied)."""
    return ComponentStateDicts(
        dict(unet.state_dict()),
        dict(vae.state_dict()),
        [normalize_text_encoder_keys(dict(te.state_dict())) for te in text_encoders],
    )


def _describe(component: str) -> str:
    return {"unet": "UNet", "vae": "VAE"}.get(component, "text encoder")
