"""Shared helpers for the model loading/conversion tests: tiny seeded models, files, comparisons."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from train_tools.models.configs import ModelSpec, build_text_encoders, build_unet, build_vae, spec
from train_tools.models.convert import normalize_text_encoder_keys


def tiny_models(family: str, seed: int = 0) -> tuple[ModelSpec, nn.Module, nn.Module, list[nn.Module]]:
    model_spec = spec(family, tiny=True)
    torch.manual_seed(seed)
    return model_spec, build_unet(model_spec), build_vae(model_spec), build_text_encoders(model_spec)


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def assert_same_weights(expected: nn.Module, actual: nn.Module) -> int:
    """Every weight of ``expected`` is in ``actual`` with an equal tensor; returns how many were compared."""
    want = normalize_text_encoder_keys(dict(expected.state_dict()))
    got = normalize_text_encoder_keys(dict(actual.state_dict()))
    assert want.keys() == got.keys()
    for key, tensor in want.items():
        assert got[key].shape == tensor.shape, key
        assert torch.equal(got[key].to(tensor.dtype), tensor), key
    return len(want)


def expanded(shape: tuple[int, ...] | torch.Size, value: float = 0.0) -> torch.Tensor:
    """A tensor of ``shape`` that takes no memory (for detection tests that only look at shapes)."""
    return torch.tensor(value).expand(*shape)


def lora_layer_count(model: nn.Module) -> int:
    """How many layers of ``model`` carry a LoRA (what a loaded LoRA file attached to it)."""
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(module, LoraLayer) for module in model.modules())


def lora_file_layer_count(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    """How many layers a kohya-layout LoRA file holds under ``prefix`` (one ``.alpha`` per layer)."""
    return sum(key.startswith(prefix + "_") and key.endswith(".alpha") for key in tensors)


def diffusers_has_peft_backend() -> bool:
    """Whether diffusers' LoRA loader works here: it needs transformers >= 4.34 (A1111 pins 4.30.2)."""
    from diffusers.utils import USE_PEFT_BACKEND

    return bool(USE_PEFT_BACKEND)
