"""A tiny demo checkpoint: random weights in the real single-file layout, a few MB, made in a second or two.

It lets the whole flow (load, train, save a LoRA) run anywhere without downloading a real model. It is
written exactly like a WebUI checkpoint (``model.diffusion_model.*``, ``first_stage_model.*``, ...), so it
goes through the same loader as real checkpoints. Its pictures are noise: it is for testing, not for art.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..demo_settings import DEMO_MARKER
from ..errors import UserError
from ..fileio import write_text, write_with
from .configs import FAMILIES, ModelSpec, build_text_encoders, build_unet, build_vae, spec
from .convert import components_from_models, diffusers_to_original

log = logging.getLogger(__name__)


def is_demo_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a demo model this module wrote (its safetensors metadata says so)."""
    from .checkpoint import safetensors_header

    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    try:
        metadata = safetensors_header(path).get("__metadata__") or {}
    except (OSError, ValueError, UserError) as exc:  # not a readable checkpoint, so not the demo model
        log.debug("Cannot read the header of %s: %s", path, exc)
        return False
    return isinstance(metadata, dict) and DEMO_MARKER in metadata


# The WebUI's sidecar config convention: parameterization "v" marks a 768-v SD2 model.
_SD2_YAML = 'model:\n  params:\n    parameterization: "{p}"\n'


def build_demo_checkpoint(path: Path, family: str = "sd1", seed: int = 0) -> Path:
    """Write the tiny ``family`` model with seeded random weights to ``path`` (.safetensors) and return it.

    SD2 variants also get a ``<stem>.yaml`` beside the file saying epsilon or v-prediction, as the WebUI's
    SD2 configs do, so that loading them does not depend on probing random weights.
    """
    if family not in FAMILIES:
        raise ValueError(f"Unknown demo family {family!r}; expected one of {', '.join(FAMILIES)}.")
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    model_spec = spec(family, tiny=True)
    # A private RNG stream: the same seed gives the same file, and the caller's random state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_unet(model_spec)
        vae = build_vae(model_spec)
        text_encoders = build_text_encoders(model_spec)
    metadata = {"format": "pt", DEMO_MARKER: model_spec.name, "seed": str(seed)}
    save_single_file(path, model_spec, unet, vae, text_encoders, metadata)
    if family in ("sd2", "sd2v"):
        write_text(path.with_suffix(".yaml"), _SD2_YAML.format(p="v" if family == "sd2v" else "eps"))
    log.info("Wrote the tiny %s demo checkpoint %s", family, path)
    return path


def save_single_file(path: Path, model_spec: ModelSpec, unet: torch.nn.Module, vae: torch.nn.Module,
                     text_encoders: list[torch.nn.Module], metadata: dict[str, str]) -> int:
    """Write the modules as one original-layout ``.safetensors`` file (as a WebUI checkpoint); the tensor count."""
    original = diffusers_to_original(components_from_models(unet, vae, text_encoders), model_spec)
    tensors = {name: tensor.detach().contiguous() for name, tensor in original.items()}
    write_with(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return len(tensors)
