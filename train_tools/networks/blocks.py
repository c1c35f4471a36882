"""The UNet's blocks as kohya numbers them, for learning rates by block (``down_lr_weight``, ``mid_lr_weight``,
``up_lr_weight``).

kohya's LoRA counts 25 blocks of an SD UNet: the input blocks IN00-IN11 (``down_blocks.i`` resnet or attention
``j`` is 1 + 3i + j, its downsampler 3i + 3; IN00, the first convolution, never has a LoRA), the middle block,
and the output blocks OUT00-OUT11 (``up_blocks.i`` resnet or attention ``j`` is 3i + j, its upsampler 3i + 2).
SDXL's UNet has fewer blocks and uses the first of those numbers. A down or up weight list has one number per
input or output block, 12 in all, as kohya writes it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from ..config import TrainConfig
from ..config_values import BLOCKS_PER_SIDE, block_values, block_weights
from .targets import is_conv3x3

# A module path ("down_blocks.1.attentions.0.") or a file's layer name ("lora_unet_down_blocks_1_attentions_0_").
_SIDE = re.compile(r"(?:^|[._])(down|up)_blocks[._](\d+)[._](attentions|resnets|downsamplers|upsamplers)[._](\d+)[._]")
_MID = re.compile(r"(?:^|[._])mid_block[._]")


def unet_block(path: str) -> tuple[str, int] | None:
    """("down", 1-11), ("mid", 0) or ("up", 0-11) for a UNet module or parameter path, or a LoRA file's layer name
    in the diffusers layout; None outside them."""
    found = _SIDE.search(path)
    if found:
        side, i, kind, j = found.group(1), int(found.group(2)), found.group(3), int(found.group(4))
        index = 3 * i + (2 if kind in ("downsamplers", "upsamplers") else j)
        return side, index + 1 if side == "down" else index
    if _MID.search(path):
        return "mid", 0
    return None


def weight_of(weights: dict[str, list[float]] | None, path: str) -> float:
    """The learning-rate weight of the block ``path`` lies in (1 outside the blocks or without weights)."""
    block = unet_block(path)
    if weights is None or block is None:
        return 1.0
    return weights[block[0]][block[1]]


def block_number(path: str) -> int | None:
    """The block's place in a 25-number list (``block_dims``): IN00-IN11 0-11, MID 12, OUT00-OUT11 13-24
    (``path`` as ``unet_block`` takes it)."""
    block = unet_block(path)
    if block is None:
        return None
    side, index = block
    return index if side == "down" else BLOCKS_PER_SIDE if side == "mid" else BLOCKS_PER_SIDE + 1 + index


# (targets, dim, alpha, the convolutions' (dim, alpha) or None): one attach call of ``types.attach_network``.
Part = tuple[list[str], int, float, tuple[int, float] | None]


def network_parts(unet: nn.Module, targets: Sequence[str], config: TrainConfig) -> list[Part]:
    """The UNet's targets in parts of one dim and alpha each, as ``block_dims`` / ``block_alphas`` (and their
    conv forms) give them; one part of every target at the network's dims without them. A block of dim 0 (or
    conv dim 0, for its 3x3 convolutions) is left out."""
    conv = config.conv_rank()
    dims, alphas = block_values(config.block_dims, "block_dims"), block_values(config.block_alphas, "block_alphas")
    conv_dims = block_values(config.conv_block_dims, "conv_block_dims")
    conv_alphas = block_values(config.conv_block_alphas, "conv_block_alphas")
    if dims is None and conv_dims is None:
        return [(list(targets), int(config.network_dim), float(config.network_alpha), conv)]
    modules = dict(unet.named_modules())
    parts: dict[tuple[int, float, tuple[int, float] | None], list[str]] = {}
    for target in targets:
        number = block_number(target)
        rank, alpha, conv_here = int(config.network_dim), float(config.network_alpha), conv
        if number is not None:
            if dims is not None:
                rank = int(dims[number])
                alpha = float(alphas[number]) if alphas is not None else float(config.network_alpha)
            if conv is not None and conv_dims is not None:
                conv_alpha = float(conv_alphas[number]) if conv_alphas is not None else conv[1]
                conv_here = (int(conv_dims[number]), conv_alpha)
        key: tuple[int, float, tuple[int, float] | None]
        if is_conv3x3(modules[target]):
            if conv_here is None or conv_here[0] == 0:
                continue
            key = (max(rank, 1), alpha, conv_here)  # the dim of a part of convolutions alone is the conv dim's
        else:
            if rank == 0:
                continue
            key = (rank, alpha, conv_here if conv_here and conv_here[0] else None)
        parts.setdefault(key, []).append(target)
    return [(found, rank, alpha, conv_part) for (rank, alpha, conv_part), found in parts.items()]


__all__ = ["BLOCKS_PER_SIDE", "block_number", "block_weights", "network_parts", "unet_block", "weight_of"]
