"""FLUX.1's transformer as diffusers builds it (``FluxTransformer2DModel``): the published layout of FLUX.1-dev
and a tiny one of the same shape for tests (the size of diffusers' own test model: one double and one single
block, head dim 16), with random weights. Training FLUX.1 LoRAs is not in this version yet (issue 19); the
network file format (``networks/flux_format.py``) is built and tested on these.
"""

from __future__ import annotations

from typing import Any

# FLUX.1-dev's transformer config (black-forest-labs' published one); schnell differs by guidance_embeds=False.
FLUX1_DEV: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
FLUX1_TINY: dict[str, Any] = {
    **FLUX1_DEV,
    "in_channels": 4,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": [4, 4, 8],
}


def build_flux_transformer(tiny: bool = False, *, schnell: bool = False) -> Any:
    """A FLUX.1 transformer with random weights (on the meta device when called inside ``torch.device("meta")``)."""
    from diffusers import FluxTransformer2DModel

    config = {**(FLUX1_TINY if tiny else FLUX1_DEV), "guidance_embeds": not schnell}
    return FluxTransformer2DModel(**config)


__all__ = ["FLUX1_DEV", "FLUX1_TINY", "build_flux_transformer"]
