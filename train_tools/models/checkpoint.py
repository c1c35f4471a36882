"""Reading single-file Stable Diffusion checkpoints safely, and telling which family a checkpoint is.

Users pick files from their WebUI's model folder: ``.safetensors`` mostly, old ``.ckpt`` pickles sometimes,
and by mistake LoRAs, VAEs, embeddings, half-downloaded files. Every one of those gets a clear UserError,
and no pickle is ever allowed to run code.
"""

from __future__ import annotations

import logging
import pickle
import struct
import types
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from .. import fileio
from ..errors import UserError
from .configs import SD1_TE_PREFIX, SD2_TE_PREFIX, SDXL_TE2_PREFIX, UNET_PREFIX, spec
from .dit_detect import DitFamily, dit_family

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# A real safetensors header is a few hundred KB at most; anything huge means "not a safetensors file".
_MAX_HEADER = 100 * 1024 * 1024

CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
MID_CROSS_ATTN_K = UNET_PREFIX + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
LABEL_EMB = UNET_PREFIX + "label_emb.0.0.weight"


# ---------------------------------------------------------------------------------------------- reading
def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file, on the CPU, in the dtype they were saved in.

    Files that are not full Stable Diffusion checkpoints (a LoRA, a VAE, an embedding, a diffusers
    component) are refused with a UserError that says what the file is.
    """
    path = Path(path)
    if _checkpoint_kind(path) == "safetensors":
        return _read_safetensors(path)
    return _read_pickle(path)


def _checkpoint_kind(path: Path) -> str:
    """"safetensors" or "pickle" for an existing checkpoint file; a UserError for anything else."""
    if not path.exists():
        raise UserError(f"The model file {path} was not found; check the path or pick a checkpoint from the list.")
    if path.is_dir():
        raise UserError(f"{path.name} is a folder; pick a single-file checkpoint (.safetensors or .ckpt) instead.")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in PICKLE_SUFFIXES:
        return "pickle"
    raise UserError(f"{path.name} is not a checkpoint file; pick a .safetensors (or .ckpt) Stable Diffusion model.")


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's size (catches truncated files)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UserError(f"{path.name} is empty or cut off; download the model again.")
        (length,) = struct.unpack("<Q", head)
        if length < 2 or length > min(_MAX_HEADER, size - 8):
            raise _not_safetensors(path)
        raw = fh.read(length)
    try:
        header = fileio.parse_json(raw)
    except fileio.JSONProblem as exc:  # not UTF-8, not JSON, or nested too deep to be a real header
        raise UserError(f"{path.name} is not a valid .safetensors file (its header {exc}); download the model "
                        "again.") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path)
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise _not_safetensors(path) from None
    if 8 + length + end > size:
        raise UserError(f"{path.name} is incomplete ({size:,} bytes of {8 + length + end:,}); the download was "
                        "cut off, so download the model again.")
    return header


def _not_safetensors(path: Path) -> UserError:
    return UserError(f"{path.name} is not a valid .safetensors file (it may be a web page or an unfinished "
                     "download); download the model again.")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    header = safetensors_header(path)
    names = [k for k in header if k != "__metadata__"]
    if not names:
        raise UserError(f"{path.name} holds no weights; pick a Stable Diffusion checkpoint.")
    shapes = {k: _shape_only(v.get("shape", [])) for k, v in header.items() if k != "__metadata__"}
    _refuse_non_checkpoints(names, path, shapes)  # a LoRA or VAE is refused before its tensors are read
    out: dict[str, torch.Tensor] = {}
    try:
        # One tensor at a time from the file: no second full copy of a multi-GB checkpoint in RAM.
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            for name in fh.keys():
                out[name] = fh.get_tensor(name)
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path.name} could not be read ({exc}); download the model again.") from exc
    return out


class _Inert:
    """Stands in for harmless non-tensor objects in old .ckpt files (training callbacks, numpy step
    counters): it accepts any arguments and state and does nothing, so nothing from the file runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


# Globals an old checkpoint may name that are mere data: replaced by _Inert, never imported.
_INERT_MODULES = ("pytorch_lightning", "lightning", "numpy", "_codecs")
_TENSOR_REBUILDERS = frozenset({"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                                "_rebuild_parameter", "_rebuild_parameter_with_state"})


class _RestrictedUnpickler(pickle.Unpickler):
    """Allows tensors, dicts and inert data only; any other global means the file wants to run code."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch._utils" and name in _TENSOR_REBUILDERS:
            return getattr(torch._utils, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch" and name == "Size":
            return torch.Size
        if module.split(".")[0] in _INERT_MODULES:
            return _Inert
        raise pickle.UnpicklingError(f"global '{module}.{name}' is forbidden")


def _restricted_load(fh: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(fh, **kwargs).load()


# torch.load wants a module-like object with Unpickler and load.
_RESTRICTED_PICKLE = types.SimpleNamespace(Unpickler=_RestrictedUnpickler, load=_restricted_load,
                                           __name__="train_tools_restricted_pickle")


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    mmap = zipfile.is_zipfile(path)  # mmap needs the zip format (torch >= 1.6); old files are read whole
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # weights_only also rejects harmless training leftovers (lightning callbacks, numpy step counters);
        # a second, stricter-than-pickle pass accepts those as inert data and still refuses everything else.
        log.debug("weights_only load refused %s: %s", path.name, exc)
        obj = _load_restricted(path, mmap)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path.name} is damaged or incomplete ({_first_line(exc)}); download the model "
                        "again.") from exc
    tensors = _tensors_of(obj, path)
    _refuse_non_checkpoints(list(tensors), path, tensors)
    return tensors


def _load_restricted(path: Path, mmap: bool) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False, mmap=mmap,
                          pickle_module=_RESTRICTED_PICKLE)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{path.name} wants to run code when it is opened ({exc}), which is refused for your "
                        "safety; use a .safetensors version of this model instead.") from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path.name} is damaged or incomplete ({_first_line(exc)}); download the model "
                        "again.") from exc


def _tensors_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{path.name} holds no state dict; pick a Stable Diffusion checkpoint.")
    out = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if len(out) != len(obj):
        log.debug("Ignoring %d non-tensor entries of %s", len(obj) - len(out), path.name)
    if not out:
        raise UserError(f"{path.name} holds no weights; pick a Stable Diffusion checkpoint.")
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------- detection
_LORA_MARKERS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1_a", ".lokr_w1", ".oft_")


def _refuse_non_checkpoints(
    keys: list[str], path: Path | None, sd: Mapping[str, Any] | None = None
) -> None:
    """UserErrors for files that are something else than a full checkpoint (LoRA, VAE, embedding, parts, a model
    of a newer family: ``sd``, the names with their shapes, tells which)."""
    name = path.name if path is not None else "This file"
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) or any(m in k for m in _LORA_MARKERS)
           for k in keys):
        raise UserError(f"{name} is a LoRA, not a checkpoint; put it in the Lora folder and choose a full "
                        "Stable Diffusion checkpoint as the base model.")
    found = dit_family(sd) if sd is not None else None
    if found is not None:
        note = f" ({found.note})" if found.note else ""
        raise UserError(f"{name} is a {found.title} model{note}; this version of Train Tools trains SD1, SD2 and "
                        f"SDXL LoRAs only, not {found.title} ones yet: choose an SD1, SD2 or SDXL checkpoint.")
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return
    if any(k.endswith("decoder.conv_out.weight") for k in keys):
        raise UserError(f"{name} is a VAE only, not a full checkpoint; put it in the VAE folder and choose a "
                        "full Stable Diffusion checkpoint as the base model.")
    if any(k in ("emb_params", "string_to_param", "clip_l", "clip_g") or k.startswith("string_to_param")
           for k in keys):
        raise UserError(f"{name} is a textual inversion embedding, not a checkpoint; choose a full Stable "
                        "Diffusion checkpoint as the base model.")
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
        raise UserError(f"{name} is a diffusers UNet file, not a single-file checkpoint; choose a full "
                        ".safetensors checkpoint as the WebUI uses.")
    raise UserError(f"{name} is not a Stable Diffusion checkpoint (it has no UNet weights); choose a full "
                    "SD1, SD2 or SDXL checkpoint.")


def detect_structure(sd: dict[str, torch.Tensor], path: Path | None = None) -> tuple[str, bool]:
    """("sd1" | "sd2" | "sdxl", tiny) from key names and shapes; SD2's 512/768-v question is left open."""
    keys = list(sd.keys())
    _refuse_non_checkpoints(keys, path, sd)
    name = path.name if path is not None else "This checkpoint"
    if CONV_IN not in sd or MID_CROSS_ATTN_K not in sd:
        raise UserError(f"{name} is not a supported Stable Diffusion checkpoint (its UNet is incomplete or of "
                        "another kind); choose a standard SD1, SD2 or SDXL checkpoint.")
    in_channels = sd[CONV_IN].shape[1]
    if in_channels != 4:
        raise UserError(f"{name} is an inpainting or instruct model ({in_channels} input channels); train on "
                        "the regular version of this model instead.")
    context = int(sd[MID_CROSS_ATTN_K].shape[1])
    if LABEL_EMB in sd or any(k.startswith(SDXL_TE2_PREFIX) for k in keys):
        if not any(k.startswith(SDXL_TE2_PREFIX) for k in keys):
            raise UserError(f"{name} looks like an SDXL refiner or an SDXL model without text encoders; "
                            "choose an SDXL base checkpoint.")
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
    raise UserError(f"{name} has an unsupported {family.upper()} architecture (text context {context}); "
                    "choose a standard checkpoint.")


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


def detect_family(sd: dict[str, torch.Tensor], path: Path | None = None, *,
                  yaml_path: Path | None = None) -> str:
    """The family of a single-file state dict: "sd1", "sd2", "sd2v", "sdxl" or "sdxlv" (tiny-ness:
    ``detect_structure``).

    SD2 512 (epsilon) vs 768-v: a sidecar YAML decides as in the WebUI; without one the UNet is built and
    probed like the WebUI does (``unet_predicts_v``).
    """
    family, tiny = detect_structure(sd, path)
    if family == "sdxl":
        return "sdxlv" if sdxl_marks(sd, path, yaml_path)[0] else "sdxl"
    if family != "sd2":
        return family
    says_v = yaml_says_v(path, yaml_path)
    if says_v is None:
        from .configs import build_unet
        from .convert import original_to_diffusers
        from .instantiate import instantiate

        model_spec = spec("sd2", tiny)
        unet = instantiate(build_unet(model_spec, empty=True), original_to_diffusers(sd, model_spec).unet, "UNet")
        says_v = unet_predicts_v(unet)
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
    family, _tiny = detect_structure(sd, path)
    if family == "sdxl":
        return "sdxlv" if sdxl_marks(sd, path, yaml_path)[0] else "sdxl"
    if family != "sd2":
        return family
    says_v = yaml_says_v(path, yaml_path)
    if says_v is None:
        says_v = _v_hint(path, metadata)
    return "sd2v" if says_v else "sd2"


# The keys a v-prediction SDXL single file carries (NoobAI-XL v-pred and its descendants; ComfyUI's detection
# reads them): an empty ``v_pred`` tensor, and ``ztsnr`` when it was trained with a zero-terminal-SNR schedule.
V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"


def sdxl_marks(sd: dict[str, Any], path: Path | None = None, yaml_path: Path | None = None) -> tuple[bool, bool]:
    """(v-prediction, zero terminal SNR) of an SDXL checkpoint: by its marker keys, or a sidecar YAML that
    says ``parameterization: "v"``."""
    v = V_PRED_KEY in sd or bool(yaml_says_v(path, yaml_path))
    return v, ZTSNR_KEY in sd


def _shape_only(shape: list[int]) -> torch.Tensor:
    """A tensor of ``shape`` that takes no memory: detection looks at names and shapes only."""
    return torch.zeros(()).expand(torch.Size(int(n) for n in shape))


def _v_hint(path: Path, metadata: dict[str, Any]) -> bool:
    """Whether an SD2 file without a config says it is a 768-v model, by its metadata or its name."""
    prediction = str(metadata.get("modelspec.prediction_type", "")).lower()
    if prediction:
        return prediction in ("v", "v_prediction", "v-prediction")
    if "768-v" in str(metadata.get("modelspec.architecture", "")):
        return True
    return "768" in path.stem
