"""The architectures of the Stable Diffusion families, as explicit diffusers/transformers configs.

Single-file checkpoints carry no config, and nothing may be downloaded, so the published values of each
family live here as plain dicts: SD1.x, SD2.x (512, epsilon), SD2.x 768-v (v-prediction) and SDXL base.
Each family also has a "tiny" variant shaped like the real one (same block types and layouts, so the same
conversion code runs on it) but small enough to build, save and train in seconds on a CPU.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tokenizers import EOS, REAL_VOCAB_SIZE, TINY_VOCAB_SIZE

FAMILIES = ("sd1", "sd2", "sd2v", "sdxl", "sdxlv")
# The architecture each family is built from: the v-prediction families differ in their target (and SD2-768 in
# its resolution), not in their layers.
ARCHITECTURES = {"sd1": "sd1", "sd2": "sd2", "sd2v": "sd2", "sdxl": "sdxl", "sdxlv": "sdxl"}


@dataclass
class TextEncoderSpec:
    """One text encoder: its CLIPTextConfig kwargs and how the original single file stores it.

    layout "hf": the transformers CLIP names under ``prefix`` (OpenAI CLIP-L in SD1 and SDXL);
    layout "openclip": OpenCLIP names (fused qkv, ``resblocks``) under ``prefix`` (SD2, SDXL's bigG).
    """

    config: dict[str, Any]
    layout: str
    prefix: str
    with_projection: bool = False
    pad_token: str = EOS
    tokenizer_kind: str = "clip-l"


@dataclass
class ModelSpec:
    family: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: list[TextEncoderSpec]
    scheduler: dict[str, Any]
    resolution: int
    prediction_type: str
    tiny: bool = False

    @property
    def name(self) -> str:
        return f"{self.family}-tiny" if self.tiny else self.family

    @property
    def context_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])


# ---------------------------------------------------------------------------------------------- UNet
_SD1_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

_SD2_UNET: dict[str, Any] = {
    **_SD1_UNET,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
}

_SDXL_UNET: dict[str, Any] = {
    **_SD1_UNET,
    "sample_size": 128,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

# Tiny: two levels (one with attention, one without), one resnet per level, 32-dim context. 8 norm groups: with
# SD's 32, the first level's GroupNorm has one channel a group and erases each channel's level, which is what
# carries a flat background's colour; the shapes demo model (training/demo_pretrain.py) drew its backgrounds at
# chance with 32 groups and 87% right with 8 after a longer pretrain (BENCHMARKS.md). The group count is no
# tensor's shape.
_TINY_SD1_UNET: dict[str, Any] = {
    **_SD1_UNET,
    "sample_size": 16,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}

_TINY_SD2_UNET: dict[str, Any] = {**_TINY_SD1_UNET, "attention_head_dim": [2, 4], "use_linear_projection": True}

_TINY_SDXL_UNET: dict[str, Any] = {
    **_TINY_SD1_UNET,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 64,  # the two text encoders' hidden states side by side: 32 + 32
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,  # six size/crop numbers + the pooled text (32)
}

# ---------------------------------------------------------------------------------------------- VAE
_SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
_SDXL_VAE: dict[str, Any] = {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
# Four blocks, so three downsamplings: the latent is 1/8 of the image, as in the real VAE. One norm group: with
# 8 groups of 2 channels, a GroupNorm wipes out what tells flat colours apart, and the shapes demo model
# (training/demo_pretrain.py) learned its colours several times slower. The group count is no tensor's shape.
_TINY_VAE: dict[str, Any] = {
    **_SD_VAE,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 1,
    "sample_size": 128,
}
_TINY_SDXL_VAE: dict[str, Any] = {**_TINY_VAE, "scaling_factor": 0.13025}

# ---------------------------------------------------------------------------------------------- text
# bos/eos/pad ids as diffusers' published text encoder configs have them: eos_token_id 2 makes transformers
# pool at the highest token id (the end token), which is right for both the real and the tiny vocabulary.
_CLIP_COMMON: dict[str, Any] = {
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
_CLIP_L: dict[str, Any] = {
    **_CLIP_COMMON,
    "vocab_size": REAL_VOCAB_SIZE,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
# OpenCLIP ViT-H text tower as diffusers has it: the original's 24th (last) layer is dropped, SD2 uses the
# penultimate layer's output.
_OPENCLIP_H: dict[str, Any] = {
    **_CLIP_COMMON,
    "vocab_size": REAL_VOCAB_SIZE,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "projection_dim": 512,
}
_OPENCLIP_BIGG: dict[str, Any] = {
    **_CLIP_COMMON,
    "vocab_size": REAL_VOCAB_SIZE,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
_TINY_TEXT: dict[str, Any] = {
    **_CLIP_COMMON,
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "projection_dim": 32,
}

SD1_TE_PREFIX = "cond_stage_model.transformer."
SD2_TE_PREFIX = "cond_stage_model.model."
SDXL_TE1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def _text_encoders(family: str, tiny: bool) -> list[TextEncoderSpec]:
    def cfg(real: dict[str, Any], act: str) -> dict[str, Any]:
        return {**_TINY_TEXT, "hidden_act": act} if tiny else dict(real)

    if family == "sd1":
        return [TextEncoderSpec(cfg(_CLIP_L, "quick_gelu"), "hf", SD1_TE_PREFIX)]
    if family in ("sd2", "sd2v"):
        return [
            TextEncoderSpec(
                cfg(_OPENCLIP_H, "gelu"), "openclip", SD2_TE_PREFIX, pad_token="!", tokenizer_kind="openclip-h"
            )
        ]
    return [
        TextEncoderSpec(cfg(_CLIP_L, "quick_gelu"), "hf", SDXL_TE1_PREFIX),
        TextEncoderSpec(
            cfg(_OPENCLIP_BIGG, "gelu"),
            "openclip",
            SDXL_TE2_PREFIX,
            with_projection=True,
            pad_token="!",
            tokenizer_kind="openclip-bigg",
        ),
    ]


def scheduler_config(prediction_type: str, zero_terminal_snr: bool = False) -> dict[str, Any]:
    """The training noise schedule (SD's scaled-linear betas); ``zero_terminal_snr`` rescales it so the last
    timestep is pure noise (diffusers' ``rescale_betas_zero_snr``, as kohya's ``--zero_terminal_snr``)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "prediction_type": prediction_type,
        "rescale_betas_zero_snr": bool(zero_terminal_snr),
    }


def spec(family: str, tiny: bool = False, zero_terminal_snr: bool = False) -> ModelSpec:
    """The architecture of ``family`` (``FAMILIES``); ``tiny`` for the small test variant; ``zero_terminal_snr``
    for a checkpoint trained with that noise schedule."""
    if family not in FAMILIES:
        raise ValueError(f"Unknown model family {family!r}; expected one of {', '.join(FAMILIES)}.")
    prediction = "v_prediction" if family in ("sd2v", "sdxlv") else "epsilon"
    arch = ARCHITECTURES[family]
    if tiny:
        unet = {"sd1": _TINY_SD1_UNET, "sd2": _TINY_SD2_UNET, "sdxl": _TINY_SDXL_UNET}
        vae = _TINY_SDXL_VAE if arch == "sdxl" else _TINY_VAE
        resolution = 128
        unet_cfg = copy.deepcopy(unet[arch])
    else:
        unet = {"sd1": _SD1_UNET, "sd2": _SD2_UNET, "sdxl": _SDXL_UNET}
        vae = _SDXL_VAE if arch == "sdxl" else _SD_VAE
        resolution = {"sd1": 512, "sd2": 512, "sd2v": 768, "sdxl": 1024, "sdxlv": 1024}[family]
        unet_cfg = copy.deepcopy(unet[arch])
        unet_cfg["sample_size"] = resolution // 8
        if family == "sd2v":
            # As diffusers' SD2.1-768 config: attention in fp32, which 768-v needs to avoid NaNs in fp16.
            unet_cfg["upcast_attention"] = True
    return ModelSpec(
        family=family,
        unet=unet_cfg,
        vae=copy.deepcopy(vae),
        text_encoders=_text_encoders(arch, tiny),
        scheduler=scheduler_config(prediction, zero_terminal_snr),
        resolution=resolution,
        prediction_type=prediction,
        tiny=tiny,
    )


def _empty_context(empty: bool) -> contextlib.AbstractContextManager[Any]:
    """Parameters on the meta device (no memory, no init time) when the caller fills them in later."""
    if not empty:
        return contextlib.nullcontext()
    from accelerate import init_empty_weights

    return init_empty_weights()


def build_unet(model_spec: ModelSpec, *, empty: bool = False) -> UNet2DConditionModel:
    """A randomly initialised UNet (or one with meta-device parameters when ``empty``)."""
    with _empty_context(empty):
        return UNet2DConditionModel(**model_spec.unet)


def build_vae(model_spec: ModelSpec, *, empty: bool = False) -> AutoencoderKL:
    with _empty_context(empty):
        return AutoencoderKL(**model_spec.vae)


def build_text_encoder(te_spec: TextEncoderSpec, *, empty: bool = False) -> torch.nn.Module:
    config = CLIPTextConfig(**te_spec.config)
    cls = CLIPTextModelWithProjection if te_spec.with_projection else CLIPTextModel
    with _empty_context(empty):
        return cls(config)


def build_text_encoders(model_spec: ModelSpec, *, empty: bool = False) -> list[torch.nn.Module]:
    """CLIPTextModel (and CLIPTextModelWithProjection second, for SDXL), randomly initialised."""
    return [build_text_encoder(te, empty=empty) for te in model_spec.text_encoders]


def build_scheduler(model_spec: ModelSpec) -> DDPMScheduler:
    # from_config drops keys a given diffusers version does not know, so one dict serves every host.
    return DDPMScheduler.from_config(model_spec.scheduler)


# ---------------------------------------------------------------------------------------------- defaults
# Training settings that depend on the family: the native resolution (the pixel budget of each bucket), bucket
# sides scaled with it (SD1's are TrainConfig's own defaults, 320..960, i.e. 0.625x to 1.875x, here on the
# 64-pixel bucket step), clip skip (SD2 and SDXL ignore it, as the WebUI does) and gradient checkpointing
# (SDXL at 1024 needs it to fit 24 GB). Every family sets the same keys, so switching checkpoints back and
# forth restores them.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd1": {
        "resolution": 512,
        "min_bucket_reso": 320,
        "max_bucket_reso": 960,
        "clip_skip": 2,
        "gradient_checkpointing": False,
    },
    "sd2": {
        "resolution": 512,
        "min_bucket_reso": 320,
        "max_bucket_reso": 960,
        "clip_skip": 1,
        "gradient_checkpointing": False,
    },
    "sd2v": {
        "resolution": 768,
        "min_bucket_reso": 512,
        "max_bucket_reso": 1408,
        "clip_skip": 1,
        "gradient_checkpointing": False,
    },
    "sdxl": {
        "resolution": 1024,
        "min_bucket_reso": 640,
        "max_bucket_reso": 1920,
        "clip_skip": 1,
        "gradient_checkpointing": True,
    },
}
_FAMILY_DEFAULTS["sdxlv"] = _FAMILY_DEFAULTS["sdxl"]


def family_defaults(family: str) -> dict[str, Any]:
    """TrainConfig values to use for a checkpoint of ``family`` (``FAMILIES``).

    Training below a model's native resolution teaches it blurry pictures, and a bucket limit under the
    resolution would make the resolution unreachable, so the tab switches these with the chosen checkpoint.
    The keys are TrainConfig fields (``TrainConfig.updated(family_defaults(f))`` applies them).
    """
    if family not in FAMILIES:
        raise ValueError(f"Unknown model family {family!r}; expected one of {', '.join(FAMILIES)}.")
    return dict(_FAMILY_DEFAULTS[family])
