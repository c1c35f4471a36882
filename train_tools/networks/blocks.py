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

from ..config_values import BLOCKS_PER_SIDE, block_weights

_SIDE = re.compile(r"(?:^|\.)(down|up)_blocks\.(\d+)\.(attentions|resnets|downsamplers|upsamplers)\.(\d+)\.")
_MID = re.compile(r"(?:^|\.)mid_block\.")


def unet_block(path: str) -> tuple[str, int] | None:
    """("down", 1-11), ("mid", 0) or ("up", 0-11) for a UNet module or parameter path; None outside them."""
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


__all__ = ["BLOCKS_PER_SIDE", "block_weights", "unet_block", "weight_of"]
