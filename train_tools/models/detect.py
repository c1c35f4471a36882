"""Telling what a checkpoint is before training on it: the Stable Diffusion family and its variant (SD1,
SD2 512 / 768-v, SDXL, v-prediction SDXL by its marker keys or a sidecar yaml) from key names and shapes, fast
enough for the picker (a ``.safetensors`` header alone), and the newer transformer families by name
(``dit_detect.py``). Reading the file, and refusing what is no checkpoint, is ``checkpoint.py``'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UserError
from .checkpoint import (
    CONV_IN,
    LABEL_EMB,
    MID_CROSS_ATTN_K,
    _checkpoint_kind,
    _read_pickle,
    _refuse_non_checkpoints,
    _shape_only,
    safetensors_header,
)
from .configs import SD1_TE_PREFIX, SD2_TE_PREFIX, SDXL_TE2_PREFIX, spec
from .dit_detect import DitFamily, dit_family

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

log = logging.getLogger(__name__)


def detect_structure(sd: dict[str, torch.Tensor], path: Path | None = None) -> tuple[str, bool]:
    """("sd1" | "sd2" | "sdxl", tiny) from key names and shapes; SD2's 512/768-v question is left open."""
    keys = list(sd.keys())
    _refuse_non_checkpoints(keys, path, sd)
    name = path.name if path is not None else "This checkpoint"
    if CONV_IN not in sd or MID_CROSS_ATTN_K not in sd:
        raise UserError(
            f"{name} is not a supported Stable Diffusion checkpoint (its UNet is incomplete or of "
            "another kind); choose a standard SD1, SD2 or SDXL checkpoint."
        )
    in_channels = sd[CONV_IN].shape[1]
    if in_channels != 4:
        raise UserError(
            f"{name} is an inpainting or instruct model ({in_channels} input channels); train on "
            "the regular version of this model instead."
        )
    context = int(sd[MID_CROSS_ATTN_K].shape[1])
    if LABEL_EMB in sd or any(k.startswith(SDXL_TE2_PREFIX) for k in keys):
        if not any(k.startswith(SDXL_TE2_PREFIX) for k in keys):
            raise UserError(
                f"{name} looks like an SDXL refiner or an SDXL model without text encoders; "
                "choose an SDXL base checkpoint."
            )
        family = "sdxl"
    elif any(k.startswith(SD2_TE_PREFIX) for k in keys):
        family = "sd2"
    elif any(k.startswith(SD1_TE_PREFIX) for k in keys):
        family = "sd1"
    else:
        raise UserError(f"{name} has no text encoder weights; choose a complete Stable Diffusion checkpoint.")
    if context == spec(family).context_dim:
        return family, False
    if context == spec(family, tiny=True).context_dim:
        return family, True
    raise UserError(
        f"{name} has an unsupported {family.upper()} architecture (text context {context}); "
        "choose a standard checkpoint."
    )


def sidecar_yaml(path: Path | None, yaml_path: Path | None = None) -> Path | None:
    """The config file the WebUI would use: ``yaml_path`` if given, else ``<checkpoint stem>.yaml`` beside it."""
    if yaml_path is not None:
        yaml_path = Path(yaml_path)
        if not yaml_path.is_file():
            raise UserError(f"The config file {yaml_path} was not found; check the path.")
        return yaml_path
    if path is None:
        return None
    candidate = Path(path).with_suffix(".yaml")
    return candidate if candidate.is_file() else None


def yaml_says_v(path: Path | None, yaml_path: Path | None = None) -> bool | None:
    """True/False when a sidecar config says v-prediction or not, None when there is no config.

    As in the WebUI: ``model.params.parameterization: "v"`` means v-prediction, anything else epsilon.
    """
    found = sidecar_yaml(path, yaml_path)
    if found is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(found.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"The config file {found.name} is not valid YAML; fix or remove it.") from exc
    model = data.get("model") if isinstance(data, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    is_v = isinstance(params, dict) and params.get("parameterization") == "v"
    log.info("%s says %s", found.name, "v-prediction" if is_v else "epsilon prediction")
    return is_v


@torch.no_grad()
def unet_predicts_v(unet: UNet2DConditionModel) -> bool:
    """The WebUI's test for SD2 checkpoints without a config: run the UNet once on a fixed input at the last
    timestep. There the noisy input is almost pure noise, so an epsilon model returns about the input itself;
    a v model returns far below it. The WebUI uses the same input (0.5 everywhere, t=999) and threshold (-1).
    """
    param = next(unet.parameters())
    context_dim = int(unet.config.cross_attention_dim)
    x = torch.full((1, 4, 8, 8), 0.5, device=param.device, dtype=torch.float32)
    context = torch.full((1, 2, context_dim), 0.5, device=param.device, dtype=torch.float32)
    dtype = param.dtype
    if dtype != torch.float32:
        unet.float()
    try:
        out = unet(x, torch.tensor([999], device=param.device), context).sample
    finally:
        if dtype != torch.float32:
            unet.to(dtype)
    score = float((out - x).mean())
    log.debug("v-prediction probe: %.3f", score)
    return score < -1.0


def detect_family(sd: dict[str, torch.Tensor], path: Path | None = None, *, yaml_path: Path | None = None) -> str:
    """The family of a single-file state dict: "sd1", "sd2", "sd2v", "sdxl" or "sdxlv" (tiny-ness:
    ``detect_structure``).

    SD2 512 (epsilon) vs 768-v: a sidecar YAML decides as in the WebUI; without one the UNet is built and
    probed like the WebUI does (``unet_predicts_v``).
    """

    def probed(tiny: bool) -> bool:
        from .configs import build_unet
        from .convert import original_to_diffusers
        from .instantiate import instantiate

        model_spec = spec("sd2", tiny)
        unet = instantiate(build_unet(model_spec, empty=True), original_to_diffusers(sd, model_spec).unet, "UNet")
        return unet_predicts_v(unet)

    return _family_with_variant(sd, path, yaml_path, probed)


def _family_with_variant(
    sd: dict[str, torch.Tensor], path: Path | None, yaml_path: Path | None, v_without_yaml: Callable[[bool], bool]
) -> str:
    """The family with its variant: SDXL's v-prediction by its marker keys; SD2's 768-v by a sidecar yaml, else
    by ``v_without_yaml(tiny)`` (loading probes the UNet, the picker reads the file's hints)."""
    family, tiny = detect_structure(sd, path)
    if family == "sdxl":
        return "sdxlv" if sdxl_marks(sd, path, yaml_path)[0] else "sdxl"
    if family != "sd2":
        return family
    says_v = yaml_says_v(path, yaml_path)
    if says_v is None:
        says_v = v_without_yaml(tiny)
    return "sd2v" if says_v else "sd2"


def detect_dit_family(path: Path | str) -> DitFamily | None:
    """The newer transformer family of a ``.safetensors`` file (FLUX.1, SD3.5, Z-Image ...) from its header, or
    None (another file, a pickle, a file that cannot be read)."""
    path = Path(path)
    try:
        if _checkpoint_kind(path) != "safetensors":
            return None
        header = safetensors_header(path)
    except (UserError, OSError):
        return None
    return dit_family({k: _shape_only(v.get("shape", [])) for k, v in header.items() if k != "__metadata__"})


def detect_checkpoint_family(path: Path | str, *, yaml_path: Path | None = None) -> str:
    """The family of a checkpoint file, "sd1", "sd2", "sd2v", "sdxl" or "sdxlv" (v-prediction SDXL, by its
    marker keys), fast enough to show beside the picker.

    A ``.safetensors`` file is judged by its header alone (tensor names and shapes, no weights are read).
    Pickles have no header and are read through the safe loader (memory-mapped where the format allows).
    Files that are no checkpoint raise the same UserErrors as loading them.

    SD2's 512/768-v question: a sidecar YAML decides, as in the WebUI. Without one, loading would probe the
    UNet (seconds for a real model), so here the file's own metadata (``modelspec.prediction_type``) or a
    "768" in its name decide; ``load_model`` still probes, and its answer is what training uses.
    """
    path = Path(path)
    metadata: dict[str, Any] = {}
    if _checkpoint_kind(path) == "safetensors":
        header = safetensors_header(path)
        metadata = header.get("__metadata__") or {}
        sd = {name: _shape_only(info.get("shape", [])) for name, info in header.items() if name != "__metadata__"}
        if not sd:
            raise UserError(f"{path.name} holds no weights; pick a Stable Diffusion checkpoint.")
    else:
        sd = _read_pickle(path)
    return _family_with_variant(sd, path, yaml_path, lambda _tiny: _v_hint(path, metadata))


# The keys a v-prediction SDXL single file carries (NoobAI-XL v-pred and its descendants; ComfyUI's detection
# reads them): an empty ``v_pred`` tensor, and ``ztsnr`` when it was trained with a zero-terminal-SNR schedule.
V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"


def sdxl_marks(sd: dict[str, Any], path: Path | None = None, yaml_path: Path | None = None) -> tuple[bool, bool]:
    """(v-prediction, zero terminal SNR) of an SDXL checkpoint: by its marker keys, or a sidecar YAML that
    says ``parameterization: "v"``."""
    v = V_PRED_KEY in sd or bool(yaml_says_v(path, yaml_path))
    return v, ZTSNR_KEY in sd


def _v_hint(path: Path, metadata: dict[str, Any]) -> bool:
    """Whether an SD2 file without a config says it is a 768-v model, by its metadata or its name."""
    prediction = str(metadata.get("modelspec.prediction_type", "")).lower()
    if prediction:
        return prediction in ("v", "v_prediction", "v-prediction")
    if "768-v" in str(metadata.get("modelspec.architecture", "")):
        return True
    return "768" in path.stem
