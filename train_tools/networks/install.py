"""Install a LoRA file into the host's Lora folder the way the WebUI's Lora card wants it.

Three files per LoRA, each written atomically::

    <name>.safetensors    the LoRA, its picture embedded as the cover (``ssmd_cover_images``, which A1111 shows
                          when no picture file is beside it, and the model spec's ``modelspec.thumbnail``)
    <name>.preview.png    the picture the card shows
    <name>.json           the card's user metadata: the trigger words as "activation text" (added to the prompt
                          with the LoRA) and the chosen "preferred weight" (used in ``<lora:name:weight>``)

The file's alias (``ss_output_name``) becomes ``<name>``: A1111 inserts ``<lora:alias:weight>`` by default, and
every epoch file of a run shares one alias, so without this two installed epochs would insert the same tag.
An existing LoRA of the same name is never replaced silently: the new one gets a free name (``name-2``) unless
``overwrite=True``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from .. import fileio
from ..errors import UserError
from ..names import MAX_COMPONENT_BYTES, TEMP_FILE_EXTRA, check_name
from .lora_format import LEGACY_HASH_END, LEGACY_HASH_START, read_lora, tensor_buffer

log = logging.getLogger(__name__)

COVER_MAX_SIDE = 512  # the embedded cover is a thumbnail: the WebUI reads every file's header when listing
PREVIEW_SUFFIX = ".preview.png"
#: The longest installed name: room for ``<name>-99.preview.png`` and its temporary twin.
INSTALL_NAME_BYTES = MAX_COMPONENT_BYTES - TEMP_FILE_EXTRA - len(f"-99{PREVIEW_SUFFIX}")
# Files that would make the card show another picture or other metadata for <name> (A1111 looks for
# <name>.<ext> first, then <name>.preview.<ext>), or that are another network called <name>.
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".gif")
_SIDECARS = tuple(_IMAGE_EXTS) + tuple(f".preview{ext}" for ext in _IMAGE_EXTS) + (".json",)
_NETWORK_EXTS = (".safetensors", ".pt", ".ckpt")

#: The keys of A1111's extra-networks user metadata (``<name>.json``) that the install writes.
USER_METADATA_KEYS = ("description", "sd version", "activation text", "preferred weight", "notes")


def install_lora(
    file: Path,
    lora_dir: Path,
    *,
    weight: float,
    activation_text: str,
    preview: Path | None,
    overwrite: bool = False,
    name: str | None = None,
    description: str | None = None,
    notes: str = "",
) -> Path:
    """Copy ``file`` into ``lora_dir`` as ``<name>.safetensors`` with its picture and card metadata.

    ``name`` defaults to the file's stem; when taken (and not ``overwrite``) a suffix makes it free. Returns
    the installed file's path.
    """
    file = Path(file)
    lora_dir = Path(lora_dir).expanduser()
    if lora_dir.exists() and not lora_dir.is_dir():
        raise UserError(f"The Lora folder {lora_dir} is a file; give a folder.")
    tensors, metadata = read_lora(file)
    if not tensors:
        raise UserError(f"{file.name} holds no tensors; choose a LoRA file.")
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        raise UserError(f"The preferred weight must be a number; got {weight!r}.") from None
    base_name = check_name(name or file.stem, "LoRA name", max_bytes=INSTALL_NAME_BYTES)
    target_name = base_name if overwrite else free_name(lora_dir, base_name)
    target = lora_dir / f"{target_name}.safetensors"

    picture = _read_picture(preview) if preview is not None else None
    metadata = dict(metadata)
    metadata["ss_output_name"] = target_name
    metadata["modelspec.title"] = target_name
    if picture is not None:
        cover = base64.b64encode(_cover_png(picture)).decode("ascii")
        metadata["ssmd_cover_images"] = json.dumps([cover])
        metadata["modelspec.thumbnail"] = f"data:image/png;base64,{cover}"
    data = _serialise(tensors, metadata)

    if overwrite:
        _remove_shadowing(lora_dir, target_name, keep_preview=picture is not None)
    if picture is not None:
        fileio.write_bytes(lora_dir / f"{target_name}{PREVIEW_SUFFIX}", _png(picture))
    fileio.write_json(
        lora_dir / f"{target_name}.json",
        user_metadata(metadata, activation_text=activation_text, weight=weight, description=description, notes=notes),
    )
    # The LoRA last: a WebUI listing the folder meanwhile finds it complete with its picture and words.
    fileio.write_bytes(target, data)
    log.info("Installed %s in %s (weight %g)", target.name, lora_dir, weight)
    return target


def free_name(lora_dir: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3`` ... the first for which no network or card file exists."""
    candidate, n = name, 2
    while _taken(lora_dir, candidate):
        candidate, n = f"{name}-{n}", n + 1
    return candidate


def _taken(lora_dir: Path, name: str) -> bool:
    return any((lora_dir / f"{name}{suffix}").exists() for suffix in _NETWORK_EXTS + _SIDECARS)


def _remove_shadowing(lora_dir: Path, name: str, *, keep_preview: bool) -> None:
    """With overwrite: drop the old card pictures that would be shown instead of (or without) the new one."""
    for suffix in _SIDECARS:
        if suffix == ".json" or (keep_preview and suffix == PREVIEW_SUFFIX):
            continue
        (lora_dir / f"{name}{suffix}").unlink(missing_ok=True)


def sd_version(metadata: dict[str, str]) -> str:
    """The card's "sd version" (A1111's SD1/SD2/SDXL/Unknown) from ``ss_base_model_version``."""
    base = metadata.get("ss_base_model_version", "")
    if base.startswith("sdxl"):
        return "SDXL"
    if base.startswith("sd_v2"):
        return "SD2"
    if base.startswith("sd_v1"):
        return "SD1"
    return "Unknown"


def user_metadata(
    metadata: dict[str, str], *, activation_text: str, weight: float, description: str | None = None, notes: str = ""
) -> dict[str, Any]:
    """A1111's ``<name>.json`` for the card."""
    if description is None:
        epoch = metadata.get("ss_epoch")
        base = metadata.get("ss_sd_model_name")
        description = (
            "Trained with Train Tools" + (f", epoch {epoch}" if epoch else "") + (f", on {base}" if base else "") + "."
        )
    return {
        "description": description,
        "sd version": sd_version(metadata),
        "activation text": activation_text.strip(),
        "preferred weight": weight,
        "notes": notes,
    }


def _read_picture(path: Path) -> Image.Image:
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise UserError(f"The preview picture {path.name} cannot be read ({exc}); make the previews again.") from exc


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _cover_png(image: Image.Image) -> bytes:
    if max(image.size) > COVER_MAX_SIDE:
        image = image.copy()
        image.thumbnail((COVER_MAX_SIDE, COVER_MAX_SIDE))
    return _png(image)


def _serialise(tensors: dict[str, Any], metadata: dict[str, str]) -> bytes:
    """The file's bytes: the same tensors, the new metadata, and ``sshs_*`` hashes true of those tensors."""
    import safetensors.torch

    data = safetensors.torch.save(tensors, metadata=metadata)
    buffer = tensor_buffer(data)
    model_hash = hashlib.sha256(buffer).hexdigest()
    legacy_hash = hashlib.sha256(buffer[LEGACY_HASH_START:LEGACY_HASH_END]).hexdigest()[:8]
    if metadata.get("sshs_model_hash") == model_hash and metadata.get("sshs_legacy_hash") == legacy_hash:
        return data
    metadata = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
    again = safetensors.torch.save(tensors, metadata=metadata)
    if bytes(tensor_buffer(again)) != bytes(buffer):
        raise RuntimeError("The tensor bytes changed when the hashes were added to the metadata.")
    return again
