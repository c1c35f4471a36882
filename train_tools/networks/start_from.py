"""Training on from a LoRA file (the setting ``network_weights``, kohya's name): the run's network takes the
file's type and dims, then starts from its weights instead of from zero.

The file's type comes from its tensors (``hada_*`` LoHa, ``lokr_*`` LoKr, ``dora_scale`` DoRA, ``lora_down``
LoRA, with 3x3 convolutions LoCon) and its dims from their shapes (a LoKr's factor from how its layers are
split), so a file of ours and one of kohya's or LyCORIS' read the same way.
Written here because neither peft nor diffusers loads a kohya file into a training network: diffusers' loader
builds an inference LoRA of its own naming, without LoHa, and peft reads only its own keys.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config_values import BLOCK_COUNT
from ..errors import UserError
from ..names import check_name
from .blocks import block_number
from .lokr import load_lokr
from .lora_format import network_modules, read_lora

log = logging.getLogger(__name__)

# The UNet's 3x3 convolutions by their key names (a LoHa stores them flat, so only the name tells).
_CONV3X3_KEY = re.compile(
    r"^lora_unet_.*_(?:resnets_\d+_conv[12]|(?:down|up)samplers_\d+_conv"  # diffusers' names
    r"|in_layers_2|out_layers_3|op|blocks_\d+_\d+_conv)$"  # the original UNet's (kohya's SDXL files)
)


def start_file(name: str, lora_dir: Path | None) -> Path:
    """The file of the setting ``network_weights``: a file name in the LoRA folder (never a path: the setting
    may come from a web request)."""
    checked = check_name(name, "LoRA to start from (setting 'network_weights')")
    if lora_dir is None:
        raise UserError("Training on from a LoRA needs a LoRA folder; pass --lora-dir.")
    path = Path(lora_dir) / checked
    if path.suffix != ".safetensors" or not path.is_file():
        raise UserError(
            f"There is no LoRA file '{checked}' in {lora_dir}; put the .safetensors file there, or empty the "
            "setting 'network_weights' to start a new LoRA."
        )
    return path


def read_start(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The file's tensors and the settings its network has (``network_type``, ``network_dim``,
    ``network_alpha``, ``conv_dim``, ``conv_alpha``, and the block dims where they differ by block); refused with
    a sentence where we cannot train it on."""
    # Copies: an older safetensors maps the file, whose tensors would change if it were written over meanwhile.
    tensors = {key: tensor.clone() for key, tensor in read_lora(path)[0].items()}
    parts = {key.split(".", 1)[1] for key in tensors if "." in key}
    if any(part.startswith("lokr_") for part in parts):
        return tensors, _lokr_settings(tensors, path.name)
    if "hada_w1_a" in parts:
        kind, down = "loha", "hada_w1_b"
    elif "lora_down.weight" in parts:
        kind, down = ("dora" if "dora_scale" in parts else "lora"), "lora_down.weight"
    else:
        raise UserError(f"{path.name} holds no LoRA layers (lora_down / hada_* tensors); choose a LoRA file.")
    # (is a 3x3 convolution, kohya's block number or None) -> the dims of those layers
    found: dict[tuple[bool, int | None], set[tuple[int, float]]] = {}
    for key, weight in tensors.items():
        if not key.endswith(f".{down}"):
            continue
        layer = key[: -len(down) - 1]
        rank = int(weight.shape[0])
        alpha = tensors.get(f"{layer}.alpha")
        dims = (rank, float(alpha) if alpha is not None else float(rank))  # no alpha: kohya's default, the rank
        is_conv = (weight.dim() == 4 and weight.shape[-1] > 1) or bool(_CONV3X3_KEY.search(layer))
        found.setdefault((is_conv, block_number(layer)), set()).add(dims)  # None outside the UNet's blocks
    linear = set().union(*(d for (c, _), d in found.items() if not c))
    conv = set().union(*(d for (c, _), d in found.items() if c))
    settings: dict[str, Any] = {"network_type": kind, "conv_dim": 0, "conv_alpha": 1.0}
    settings.update(dict.fromkeys(("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"), ""))
    if conv and kind == "lora":
        settings["network_type"] = "locon"
    if len(linear) <= 1 and len(conv) <= 1:
        (settings["network_dim"], settings["network_alpha"]) = next(iter(linear or conv))
        if conv:
            settings["conv_dim"], settings["conv_alpha"] = next(iter(conv))
        return tensors, settings
    return tensors, {**settings, **_block_settings(found, path.name)}


def _by_layer(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A file's tensors by layer: ``{"lora_unet_x": {"lora_down.weight": ..., "alpha": ...}}``."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        layer, _, part = key.partition(".")
        layers.setdefault(layer, {})[part] = tensor
    return layers


def _lokr_settings(tensors: dict[str, torch.Tensor], name: str) -> dict[str, Any]:
    """A LoKr file's settings: its factor, the rank of its low-rank w2 sides and their alpha (the linear layers'
    and the 3x3 convolutions'), checked to be what this trainer builds (peft's LoKr with a full w1)."""
    layers = _by_layer(tensors)
    if any(p in parts for parts in layers.values() for p in ("lokr_w1_a", "lokr_t2")):
        raise UserError(
            f"{name} is a LoKr with a decomposed w1 or the Tucker form, which this trainer does not build; "
            "start a new LoKr."
        )
    dims: dict[bool, set[tuple[int, float]]] = {False: set(), True: set()}
    fulls: dict[bool, int] = {False: 1, True: 1}
    sides = []  # (out, in, w1 shape, w2 shape) of each layer that is not a 3x3 convolution
    has_conv = False
    for layer, parts in layers.items():
        w1, full, pair = parts.get("lokr_w1"), parts.get("lokr_w2"), (parts.get("lokr_w2_a"), parts.get("lokr_w2_b"))
        w2_ok = (full is not None and full.dim() in (2, 4)) or all(t is not None and t.dim() == 2 for t in pair)
        if w1 is None or w1.dim() != 2 or not w2_ok:
            raise UserError(
                f"{name}: its layer {layer} is not a LoKr of LyCORIS' form (a lokr_w1 matrix with lokr_w2 or "
                "lokr_w2_a / lokr_w2_b); choose another file."
            )
        w2 = parts.get("lokr_w2", w1)
        is_conv = bool(_CONV3X3_KEY.search(layer)) or (w2.dim() == 4 and w2.shape[-1] > 1)  # not SD1's 1x1 proj_in
        has_conv |= is_conv
        if "lokr_w2_b" in parts:
            rank, alpha = int(parts["lokr_w2_b"].shape[0]), parts.get("alpha")
            dims[is_conv].add((rank, float(alpha) if alpha is not None else float(rank)))
            n_out, n_in = int(parts["lokr_w2_a"].shape[0]), int(parts["lokr_w2_b"].shape[1])
        else:  # a full w2: any rank of at least half its larger side builds it
            n_out, n_in = int(parts["lokr_w2"].shape[0]), int(parts["lokr_w2"].shape[1])
            fulls[is_conv] = max(fulls[is_conv], -(-max(n_out, n_in) // 2))
        if not is_conv:
            sides.append((int(w1.shape[0]) * n_out, int(w1.shape[1]) * n_in, tuple(w1.shape), (n_out, n_in)))
    if len(dims[False]) > 1 or len(dims[True]) > 1:
        raise UserError(f"{name} is a LoKr whose dims differ by layer; training on from it is not supported yet.")
    linear = next(iter(dims[False]), (fulls[False], float(fulls[False])))
    settings: dict[str, Any] = {"network_type": "lokr", "network_dim": linear[0], "network_alpha": linear[1]}
    settings.update(dict.fromkeys(("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"), ""))
    conv = next(iter(dims[True]), (fulls[True], float(fulls[True]))) if has_conv else (0, 1.0)
    settings["conv_dim"], settings["conv_alpha"] = conv
    settings["lokr_factor"] = _lokr_factor(sides, name)
    return settings


def _lokr_factor(sides: list[tuple[int, int, tuple[int, ...], tuple[int, int]]], name: str) -> int:
    """The ``factor`` that splits every layer's sides as the file has them, by peft's own factorization."""
    from peft.tuners.lokr.layer import factorization

    candidates = [-1] + sorted({d for _, _, w1, _ in sides for d in w1 if d > 1})
    for factor in candidates:
        if all(
            factorization(out, factor) == (w1[0], w2[0]) and factorization(inp, factor) == (w1[1], w2[1])
            for out, inp, w1, w2 in sides
        ):
            return factor
    raise UserError(f"{name} is a LoKr split by no single factor; training on from it is not supported yet.")


def _block_settings(found: dict[tuple[bool, int | None], set[tuple[int, float]]], name: str) -> dict[str, Any]:
    """Dims that differ by block (a file trained with block dims): ``block_dims`` / ``block_alphas`` and their
    conv forms, 0 for a block without layers; the layers outside the blocks (the text encoders') give the
    network's dim. Dims that differ within a block are refused."""
    if any(len(dims) > 1 for dims in found.values()):
        raise UserError(f"{name} has different dims within one block; training on from it is not supported yet.")
    outside = {next(iter(d)) for (c, b), d in found.items() if b is None and not c}
    if len(outside) > 1 or any(b is None for c, b in found if c):
        raise UserError(f"{name} has different dims outside the UNet's blocks; training on from it is not supported.")
    per_block = {(c, b): next(iter(d)) for (c, b), d in found.items() if b is not None}

    def lists(conv: bool, absent_alpha: float) -> tuple[str, str]:
        """(dims, alphas) of every block, as settings: a block without such layers has dim 0."""
        dims = [per_block.get((conv, b), (0, absent_alpha)) for b in range(BLOCK_COUNT)]
        return ",".join(str(d) for d, _ in dims), ",".join(str(a) for _, a in dims)

    linear = [dims for (c, _), dims in per_block.items() if not c]
    base = next(iter(outside)) if outside else max(set(linear), key=linear.count) if linear else (1, 1.0)
    settings: dict[str, Any] = {"network_dim": base[0], "network_alpha": base[1]}
    settings["block_dims"], settings["block_alphas"] = lists(False, base[1])
    convs = [dims for (c, _), dims in per_block.items() if c]
    if convs:
        common = max(set(convs), key=convs.count)
        settings.update(conv_dim=common[0], conv_alpha=common[1])
        settings["conv_block_dims"], settings["conv_block_alphas"] = lists(True, common[1])
    return settings


_SGM = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_(?:(\d+)_)?(.+)$")
_SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj"}
_SGM_RESNET_SKIP = "skip_connection"


def sgm_names(tensors: dict[str, torch.Tensor], unet_config: Any) -> dict[str, torch.Tensor]:
    """A kohya SDXL file's names in the original (SGM) UNet's layout, ``lora_unet_input_blocks_4_1_...``, in the
    diffusers layout this trainer's network has, ``lora_unet_down_blocks_1_attentions_0_...``; other files as
    they are. The numbering follows from the UNet's config: each down block has ``layers_per_block`` entries and
    a downsampler (the last has none), each up block one entry more, the middle block resnet, attention,
    resnet. Written here because diffusers maps these names only inside its own LoRA loader."""
    if not any(_SGM.match(key.split(".", 1)[0]) for key in tensors):
        return tensors
    per = int(unet_config.layers_per_block)
    attends = ["CrossAttn" in kind for kind in unet_config.up_block_types]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        layer, dot, part = key.partition(".")
        found = _SGM.match(layer)
        out[(_diffusers_layer(found, per, attends) if found else layer) + dot + part] = tensor
    return out


def _diffusers_layer(found: re.Match[str], per: int, attends: list[bool]) -> str:
    where, n, k, inner = found.group(1), int(found.group(2)), found.group(3), found.group(4)
    if where == "middle_block":  # middle_block_<n>_<inner>: resnet, attention, resnet
        block = "resnets_0" if n == 0 else "attentions_0" if n == 1 else "resnets_1"
        return f"lora_unet_mid_block_{block}_{_resnet_inner(inner) if 'resnets' in block else inner}"
    k_index = int(k) if k is not None else 0
    if where == "input_blocks":
        b, j = (n - 1) // (per + 1), (n - 1) % (per + 1)
        if j == per:  # the downsampler: input_blocks_<n>_0_op
            return f"lora_unet_down_blocks_{b}_downsamplers_0_{'conv' if inner == 'op' else inner}"
        if k_index == 0:
            return f"lora_unet_down_blocks_{b}_resnets_{j}_{_resnet_inner(inner)}"
        return f"lora_unet_down_blocks_{b}_attentions_{j}_{inner}"
    b, j = n // (per + 1), n % (per + 1)
    if k_index == 0:
        return f"lora_unet_up_blocks_{b}_resnets_{j}_{_resnet_inner(inner)}"
    if k_index == 1 and attends[b]:
        return f"lora_unet_up_blocks_{b}_attentions_{j}_{inner}"
    return f"lora_unet_up_blocks_{b}_upsamplers_0_{inner}"


def _resnet_inner(inner: str) -> str:
    return "conv_shortcut" if inner == _SGM_RESNET_SKIP else _SGM_RESNET.get(inner, inner)


def load_start(
    models: list[tuple[nn.Module, str, bool]], tensors: dict[str, torch.Tensor], name: str, text_encoder_trained: bool
) -> int:
    """Copy the file's weights into the freshly attached network of ``models`` (``lora_format.model_prefixes``);
    the number of layers loaded. A layer the file has and the network lacks, or of another shape, means the file
    is of another model: refused with a sentence, before any step."""
    live: dict[str, tuple[nn.Module, dict[str, torch.Tensor]]] = {}
    for model, prefix, text_encoder in models:
        live.update(network_modules(model, prefix, text_encoder=text_encoder))
    unet = next((model for model, _, text_encoder in models if not text_encoder), None)
    if unet is not None and hasattr(unet, "config"):
        tensors = sgm_names(tensors, unet.config)  # kohya's SDXL files
    by_layer = _by_layer(tensors)
    unknown = sorted(set(by_layer) - set(live))
    if unknown and not text_encoder_trained and all(u.startswith("lora_te") for u in unknown):
        raise UserError(f"{name} has text-encoder layers: turn on 'Train text encoder' to train on from it.")
    if unknown:
        raise UserError(
            f"{name} does not fit this base model: {len(unknown)} of its {len(by_layer)} layers are not in it "
            f"(e.g. {unknown[0]}); choose a LoRA made for this model's family."
        )
    with torch.no_grad():
        for layer, parts in by_layer.items():
            if "lokr_w1" in parts:  # its live tensors are partly scaled copies: written into the layer itself
                misfit = load_lokr(live[layer][0], parts)
                if misfit is not None:
                    raise UserError(
                        f"{name} does not fit this base model: {layer}.{misfit} is not of this model's shape; "
                        "choose a LoRA made for this model."
                    )
                continue
            for part, tensor in parts.items():
                target = live[layer][1].get(part)
                if target is None or target.shape != tensor.shape:
                    shape = "no such part" if target is None else f"{tuple(target.shape)} here"
                    raise UserError(
                        f"{name} does not fit this base model: {layer}.{part} is {tuple(tensor.shape)}, {shape}; "
                        "choose a LoRA made for this model."
                    )
                if part == "alpha":
                    if not torch.allclose(target, tensor.float()):
                        raise UserError(f"{name}: {layer} has alpha {float(tensor):g}, the run {float(target):g}.")
                    continue
                target.copy_(tensor.to(target.dtype))
    missing = len(set(live) - set(by_layer))
    if missing:
        log.info(
            "%s has no weights for %d of the network's %d layers: those start from zero.", name, missing, len(live)
        )
    return len(by_layer)


__all__ = ["load_start", "read_start", "sgm_names", "start_file"]
