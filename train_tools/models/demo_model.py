"""The tiny demo checkpoints, in the real single-file layout (``model.diffusion_model.*``,
``first_stage_model.*``, ...), so they go through the same loader as real checkpoints.

* The shapes demo model (``SHAPES_DEMO``, shipped in the package, 3.8 MB): the tiny SD1 model pretrained on
  the shapes world by ``python -m train_tools demo-model pretrain`` (``training/demo_pretrain.py``). It draws
  "a red circle on a blue background" and the like; it is what "Use demo model" installs, so a newcomer's
  first LoRA visibly learns something. A toy world, not art.
* Random tiny models of every family (``build_demo_checkpoint``), made in a second or two: the tests' and the
  benchmark's models. Their pictures are noise.
"""

from __future__ import annotations

import filecmp
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..demo_settings import DEMO_MARKER
from ..errors import UserError
from ..fileio import write_text, write_with
from .configs import FAMILIES, ModelSpec, build_text_encoders, build_unet, build_vae, spec
from .convert import components_from_models, diffusers_to_original

log = logging.getLogger(__name__)

#: The pretrained shapes demo model shipped with the package (see the module's docstring).
SHAPES_DEMO = Path(__file__).with_name("shapes_demo.safetensors")


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


def install_shapes_demo(path: Path) -> Path:
    """Put the shipped shapes demo model at ``path`` unless the same file is there already (an older, random
    demo model there is replaced: it is ours, and its pictures were noise); returns ``path``."""
    path = Path(path)
    if path.is_file() and filecmp.cmp(path, SHAPES_DEMO, shallow=False):
        return path
    if path.exists() and not is_demo_checkpoint(path):
        raise UserError(f"{path} is in the way of the demo model and is not one; move it or rename it.")
    log.info("Installing the shapes demo model at %s", path)
    write_with(path, lambda tmp: shutil.copyfile(SHAPES_DEMO, tmp))
    return path


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


def save_single_file(
    path: Path,
    model_spec: ModelSpec,
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoders: list[torch.nn.Module],
    metadata: dict[str, str],
) -> int:
    """Write the modules as one original-layout ``.safetensors`` file (as a WebUI checkpoint); the tensor count."""
    original = diffusers_to_original(components_from_models(unet, vae, text_encoders), model_spec)
    tensors = {name: tensor.detach().contiguous() for name, tensor in original.items()}
    write_with(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return len(tensors)
