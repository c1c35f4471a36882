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
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .. import fileio
from ..errors import UserError
from .configs import UNET_PREFIX
from .dit_detect import dit_family

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
    """ "safetensors" or "pickle" for an existing checkpoint file; a UserError for anything else."""
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
        raise UserError(
            f"{path.name} is not a valid .safetensors file (its header {exc}); download the model again."
        ) from None
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
        raise UserError(
            f"{path.name} is incomplete ({size:,} bytes of {8 + length + end:,}); the download was "
            "cut off, so download the model again."
        )
    return header


def _not_safetensors(path: Path) -> UserError:
    return UserError(
        f"{path.name} is not a valid .safetensors file (it may be a web page or an unfinished "
        "download); download the model again."
    )


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
            for name in fh.keys():  # noqa: SIM118 - safe_open is not iterable
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
_TENSOR_REBUILDERS = frozenset(
    {
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
    }
)


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
_RESTRICTED_PICKLE = types.SimpleNamespace(
    Unpickler=_RestrictedUnpickler, load=_restricted_load, __name__="train_tools_restricted_pickle"
)


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
        raise UserError(
            f"{path.name} is damaged or incomplete ({_first_line(exc)}); download the model again."
        ) from exc
    tensors = _tensors_of(obj, path)
    _refuse_non_checkpoints(list(tensors), path, tensors)
    return tensors


def _load_restricted(path: Path, mmap: bool) -> Any:
    try:
        return torch.load(
            str(path), map_location="cpu", weights_only=False, mmap=mmap, pickle_module=_RESTRICTED_PICKLE
        )
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"{path.name} wants to run code when it is opened ({exc}), which is refused for your "
            "safety; use a .safetensors version of this model instead."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(
            f"{path.name} is damaged or incomplete ({_first_line(exc)}); download the model again."
        ) from exc


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


def _refuse_non_checkpoints(keys: list[str], path: Path | None, sd: Mapping[str, Any] | None = None) -> None:
    """UserErrors for files that are something else than a full checkpoint (LoRA, VAE, embedding, parts, a model
    of a newer family: ``sd``, the names with their shapes, tells which)."""
    name = path.name if path is not None else "This file"
    if any(
        k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) or any(m in k for m in _LORA_MARKERS)
        for k in keys
    ):
        raise UserError(
            f"{name} is a LoRA, not a checkpoint; put it in the Lora folder and choose a full "
            "Stable Diffusion checkpoint as the base model."
        )
    found = dit_family(sd) if sd is not None else None
    if found is not None:
        note = f" ({found.note})" if found.note else ""
        raise UserError(
            f"{name} is a {found.title} model{note}; this version of Train Tools trains SD1, SD2 and "
            f"SDXL LoRAs only, not {found.title} ones yet: choose an SD1, SD2 or SDXL checkpoint."
        )
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return
    if any(k.endswith("decoder.conv_out.weight") for k in keys):
        raise UserError(
            f"{name} is a VAE only, not a full checkpoint; put it in the VAE folder and choose a "
            "full Stable Diffusion checkpoint as the base model."
        )
    if any(k in ("emb_params", "string_to_param", "clip_l", "clip_g") or k.startswith("string_to_param") for k in keys):
        raise UserError(
            f"{name} is a textual inversion embedding, not a checkpoint; choose a full Stable "
            "Diffusion checkpoint as the base model."
        )
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
        raise UserError(
            f"{name} is a diffusers UNet file, not a single-file checkpoint; choose a full "
            ".safetensors checkpoint as the WebUI uses."
        )
    raise UserError(
        f"{name} is not a Stable Diffusion checkpoint (it has no UNet weights); choose a full "
        "SD1, SD2 or SDXL checkpoint."
    )


def _shape_only(shape: list[int]) -> torch.Tensor:
    """A tensor of ``shape`` that takes no memory: detection looks at names and shapes only."""
    return torch.zeros(()).expand(torch.Size(int(n) for n in shape))
