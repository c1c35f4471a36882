"""Writing a trained LoRA as the kohya-style ``.safetensors`` file that A1111, Forge, ComfyUI and diffusers load.

Key layout, alpha meaning and metadata follow the LoRA file format reference. The conversion is written
here because no library does it: diffusers and peft only *read* this layout (diffusers' converter goes the
other way), and peft's own ``get_peft_model_state_dict`` writes dotted ``lora_A`` keys that the WebUI loads
nothing from.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..config import TrainConfig
from ..errors import UserError
from ..fileio import write_bytes
from .types import layer_tensors, network_metadata

log = logging.getLogger(__name__)

UNET_PREFIX = "lora_unet"

# A1111's hash of a LoRA: the tensor buffer only, so that editing the metadata keeps the hash.
LEGACY_HASH_START = 0x100000
LEGACY_HASH_END = 0x110000

# Wrapper prefixes that are not part of a layer's name in the base model: peft's PeftModel, torch.compile,
# DataParallel/DDP (accelerate's unwrap normally removes the last two already).
_WRAPPER_PREFIXES = ("base_model.model.", "_orig_mod.", "module.")


@dataclass(frozen=True)
class _Family:
    base_model_version: str
    v2: bool
    architecture: str
    prediction_type: str
    text_encoder_prefixes: tuple[str, ...]


FAMILIES: dict[str, _Family] = {
    "sd1": _Family("sd_v1", False, "stable-diffusion-v1/lora", "epsilon", ("lora_te",)),
    "sd2": _Family("sd_v2", True, "stable-diffusion-v2-512/lora", "epsilon", ("lora_te",)),
    "sd2v": _Family("sd_v2_v", True, "stable-diffusion-v2-768-v/lora", "v", ("lora_te",)),
    "sdxl": _Family("sdxl_base_v1-0", False, "stable-diffusion-xl-v1-base/lora", "epsilon", ("lora_te1", "lora_te2")),
    # kohya writes a v-prediction SDXL LoRA as SDXL with ss_v_parameterization (and modelspec's "v").
    "sdxlv": _Family("sdxl_base_v1-0", False, "stable-diffusion-xl-v1-base/lora", "v", ("lora_te1", "lora_te2")),
}

# The metadata every file carries (the reference's "must have" list); tests and readers check against it.
REQUIRED_METADATA_KEYS: tuple[str, ...] = (
    "ss_output_name",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_base_model_version",
    "ss_v2",
    "ss_sd_model_name",
    "ss_resolution",
    "ss_clip_skip",
    "ss_num_train_images",
    "ss_training_started_at",
    "ss_tag_frequency",
    "ss_dataset_dirs",
    "ss_epoch",
    "ss_steps",
    "ss_learning_rate",
    "ss_unet_lr",
    "ss_text_encoder_lr",
    "ss_optimizer",
    "ss_lr_scheduler",
    "ss_num_epochs",
    "ss_batch_size_per_device",
    "ss_mixed_precision",
    "ss_seed",
    "ss_noise_offset",
    "ss_min_snr_gamma",
    "ss_gradient_checkpointing",
    "ss_cache_latents",
    "ss_enable_bucket",
    "ss_min_bucket_reso",
    "ss_max_bucket_reso",
    "ss_bucket_info",
    "ss_flip_aug",
    "ss_shuffle_caption",
    "ss_keep_tokens",
    "ss_max_token_length",
    "ss_training_finished_at",
    "ss_new_sd_model_hash",
    "sshs_model_hash",
    "sshs_legacy_hash",
    "modelspec.sai_model_spec",
    "modelspec.architecture",
    "modelspec.title",
    "modelspec.resolution",
    "modelspec.date",
    "modelspec.prediction_type",
)
# Metadata values that are JSON text rather than plain strings.
JSON_METADATA_KEYS: tuple[str, ...] = (
    "ss_tag_frequency",
    "ss_dataset_dirs",
    "ss_bucket_info",
    "ss_network_args",
    "ssmd_cover_images",
)
_HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")


# ---------------------------------------------------------------------------------------------- tensors
def kohya_state_dict(
    unet: nn.Module | None = None,
    text_encoders: Sequence[nn.Module] = (),
    family: str = "sd1",
) -> dict[str, torch.Tensor]:
    """The network of adapted models as kohya keys: ``<prefix>_<path>.<part>``, where the parts are
    ``lora_down.weight`` / ``lora_up.weight`` / ``alpha`` for LoRA and LoCon, the LyCORIS names for LoHa and
    LoKr and ``dora_scale`` beside LoRA's for DoRA (``types.layer_tensors``).

    ``unet`` gets ``lora_unet``; ``text_encoders`` get ``lora_te`` (SD1/SD2, one encoder) or ``lora_te1`` /
    ``lora_te2`` (SDXL, in that order). Pass only the models that were trained: a model without LoRA layers is
    an error, so an untrained text encoder must be left out. Weights are detached CPU copies in their training
    dtype; ``alpha`` is a float32 scalar (the hosts' scale is alpha / rank).
    """
    out: dict[str, torch.Tensor] = {}
    for model, prefix, text_encoder in model_prefixes(unet, text_encoders, family):
        _add_model(out, model, prefix, text_encoder=text_encoder)
    if not out:
        raise ValueError("kohya_state_dict needs a UNet or a text encoder.")
    return out


def model_prefixes(
    unet: nn.Module | None, text_encoders: Sequence[nn.Module], family: str
) -> list[tuple[nn.Module, str, bool]]:
    """(model, key prefix, is a text encoder) of each model with a network: ``lora_unet``, then ``lora_te`` (SD1,
    SD2) or ``lora_te1`` / ``lora_te2`` (SDXL, in that order)."""
    spec = _family(family)
    text_encoders = list(text_encoders)
    if len(text_encoders) > len(spec.text_encoder_prefixes):
        raise ValueError(
            f"A {family} LoRA has at most {len(spec.text_encoder_prefixes)} text encoder(s); got {len(text_encoders)}."
        )
    found = [(unet, UNET_PREFIX, False)] if unet is not None else []
    return found + [(te, prefix, True) for prefix, te in zip(spec.text_encoder_prefixes, text_encoders, strict=False)]


def network_layers(model: nn.Module, prefix: str, *, text_encoder: bool) -> dict[str, dict[str, torch.Tensor]]:
    """Each adapted layer of ``model`` by its key name (``lora_unet_down_blocks_0_...``): its tensors under the
    file's names, the live weights (``types.layer_tensors``)."""
    return {name: tensors for name, (_, tensors) in network_modules(model, prefix, text_encoder=text_encoder).items()}


def network_modules(
    model: nn.Module, prefix: str, *, text_encoder: bool
) -> dict[str, tuple[nn.Module, dict[str, torch.Tensor]]]:
    """Each adapted layer of ``model`` by its key name: the layer and its tensors under the file's names."""
    layers: dict[str, tuple[nn.Module, dict[str, torch.Tensor]]] = {}
    for path, module in model.named_modules():
        tensors = layer_tensors(module)
        if tensors is None:
            continue
        name = f"{prefix}_{_base_path(path, text_encoder).replace('.', '_')}"
        if name in layers:
            raise ValueError(f"Two layers map to the same LoRA key {name!r}.")
        layers[name] = (module, tensors)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no network layers (for {prefix}).")
    return layers


def _add_model(out: dict[str, torch.Tensor], model: nn.Module, prefix: str, *, text_encoder: bool) -> None:
    for name, tensors in network_layers(model, prefix, text_encoder=text_encoder).items():
        for part, tensor in tensors.items():
            out[f"{name}.{part}"] = _detached_copy(tensor)


def _base_path(path: str, text_encoder: bool) -> str:
    """The layer's path in the unwrapped base model, text encoders in transformers 4.x ``CLIPTextModel`` form."""
    changed = True
    while changed:
        changed = False
        for wrapper in _WRAPPER_PREFIXES:
            if path.startswith(wrapper):
                path, changed = path[len(wrapper) :], True
    path = path.replace("._orig_mod.", ".")
    if text_encoder and not path.startswith("text_model."):
        # transformers 5 dropped CLIPTextModel's ``text_model`` wrapper; every loader expects the 4.x names
        # (lora_te_text_model_encoder_layers_...), which CLIPTextModelWithProjection still has.
        path = f"text_model.{path}"
    return path


def _detached_copy(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type == "meta":
        return tensor.detach()
    return tensor.detach().to("cpu", copy=True)


# ---------------------------------------------------------------------------------------------- metadata
def build_metadata(
    config: TrainConfig,
    *,
    family: str,
    output_name: str,
    base_model_path: Path | None,
    base_model_sha256: str | None,
    num_train_images: int,
    tag_frequency: dict[str, dict[str, int]],
    dataset_dirs: dict[str, dict[str, int]],
    epoch: int,
    steps: int,
    training_started_at: float,
    training_finished_at: float | None,
    bucket_info: dict | None,
    cover_image_png: bytes | None = None,
    mixed_precision: str | None = None,
    optimizer: str | None = None,
    prediction_type: str | None = None,
    zero_terminal_snr: bool | None = None,
) -> dict[str, str]:
    """The file's metadata: the settings' ``ss_*`` strings plus the facts of this run, all values ``str``.

    ``sshs_model_hash``/``sshs_legacy_hash`` are added by ``save_lora`` (they depend on the saved tensors).
    ``training_finished_at=None`` (a mid-training save) records the time of this call, as kohya does.
    ``mixed_precision`` is the precision the run really trained in ("no" = fp32, e.g. bf16 asked for on a CPU
    without bf16), and ``optimizer`` the optimizer that stepped, in kohya's ``module.Class(args)`` form
    (``optim.describe_optimizer``), ``prediction_type`` / ``zero_terminal_snr`` what the model was trained
    with (a marked checkpoint turns them on by itself): the file says those, not what was asked.
    """
    spec = _family(family)
    finished = time.time() if training_finished_at is None else float(training_finished_at)
    resolution = int(config.resolution)
    meta = dict(config.ss_metadata())
    network_module, network_args = network_metadata(config)
    if mixed_precision is not None:
        meta["ss_mixed_precision"] = mixed_precision
    if optimizer is not None:
        meta["ss_optimizer"] = optimizer
    meta.update(
        {
            "ss_output_name": output_name,
            "ss_network_module": network_module,
            "ss_network_dim": str(config.network_dim),
            "ss_network_alpha": str(float(config.network_alpha)),
            "ss_network_args": json.dumps(network_args),
            "ss_network_train_unet_only": str(not config.train_text_encoder),
            "ss_base_model_version": spec.base_model_version,
            "ss_v2": str(spec.v2),
            "ss_sd_model_name": Path(base_model_path).name if base_model_path else Path(config.base_model).name,
            "ss_new_sd_model_hash": base_model_sha256 or "",
            "ss_resolution": f"({resolution}, {resolution})",
            "ss_num_train_images": str(int(num_train_images)),
            "ss_tag_frequency": json.dumps(tag_frequency),
            "ss_dataset_dirs": json.dumps(dataset_dirs),
            "ss_bucket_info": json.dumps(bucket_info),
            "ss_epoch": str(int(epoch)),
            "ss_steps": str(int(steps)),
            "ss_training_started_at": str(float(training_started_at)),
            "ss_training_finished_at": str(finished),
            "modelspec.sai_model_spec": "1.0.1",
            "modelspec.architecture": spec.architecture,
            "modelspec.implementation": "diffusers",
            "modelspec.title": output_name,
            "modelspec.resolution": f"{resolution}x{resolution}",
            "modelspec.date": datetime.fromtimestamp(finished).astimezone().isoformat(timespec="seconds"),
            "modelspec.prediction_type": spec.prediction_type,
        }
    )
    if not config.train_text_encoder:
        # Nothing was trained at that rate; a number here would claim a text-encoder LoRA the file lacks.
        meta["ss_text_encoder_lr"] = "0.0"
    if family != "sd1":
        # The WebUI ignores clip skip for SD2 and SDXL (the penultimate layer is built in) and so does the
        # trainer: record what was used, not what was asked for.
        meta["ss_clip_skip"] = "1"
    if prediction_type is not None:
        v = prediction_type == "v_prediction"
        meta["ss_v_parameterization"] = str(v)
        meta["modelspec.prediction_type"] = "v" if v else "epsilon"
    if zero_terminal_snr is not None:
        meta["ss_zero_terminal_snr"] = str(bool(zero_terminal_snr))
    if cover_image_png is not None:
        meta["ssmd_cover_images"] = json.dumps([base64.b64encode(cover_image_png).decode("ascii")])
    return {str(key): _as_str(value) for key, value in meta.items()}


def _as_str(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _family(family: str) -> _Family:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"Unknown model family {family!r}; expected one of {', '.join(FAMILIES)}.") from None


# ---------------------------------------------------------------------------------------------- file
def save_lora(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], dtype: torch.dtype = torch.float16
) -> None:
    """Write the LoRA file atomically, with ``sshs_model_hash``/``sshs_legacy_hash`` describing its tensors.

    Weights are cast to ``dtype``. Every ``.alpha`` stays a float32 0-dim tensor: kohya writes it in the save
    dtype, but every loader reads it with ``.item()`` (A1111, Forge, ComfyUI, diffusers), so float32 costs 4
    bytes a layer and keeps an alpha such as 0.3 exact instead of rounding it to the nearest fp16.
    """
    path = Path(path)
    bad = [key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)]
    if bad:
        raise TypeError(f"LoRA metadata values must be str; {bad[0]!r} is not.")
    prepared: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if key.endswith(".alpha"):
            prepared[key] = tensor.detach().to("cpu", torch.float32).reshape(())
        else:
            # A copy: trained weights are views of one flat tensor (flat_params.py), and safetensors refuses
            # tensors that share memory.
            prepared[key] = tensor.detach().to("cpu", dtype, copy=True).contiguous()
        if not torch.isfinite(prepared[key]).all():
            raise UserError(
                f"The LoRA weights are not finite ({key}); training diverged: lower the learning rate, or save "
                "in bf16/fp32 if the weights are too large for fp16."
            )
    meta = {key: value for key, value in metadata.items() if key not in _HASH_KEYS}
    first = safetensors.torch.save(prepared, metadata=meta)
    buffer = tensor_buffer(first)
    model_hash, legacy_hash = _buffer_hashes(buffer)
    meta.update({"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash})
    data = safetensors.torch.save(prepared, metadata=meta)
    # The hashes are only true if adding them left the tensor bytes alone (safetensors orders the data by
    # dtype and name, never by metadata); check rather than trust it.
    if tensor_buffer(data) != buffer:
        raise RuntimeError("The tensor bytes changed when the hashes were added to the metadata.")
    write_bytes(path, data)
    log.info("Saved LoRA %s (%d tensors, %.1f MB).", path.name, len(prepared), len(data) / 1e6)


def tensor_buffer(data: bytes) -> memoryview:
    """The tensor bytes of a serialised safetensors file: all after the 8-byte header length and the header."""
    if len(data) < 8:
        raise ValueError("Not a safetensors file: shorter than its header length.")
    (header_len,) = struct.unpack("<Q", data[:8])
    return memoryview(data)[8 + header_len :]


def _buffer_hashes(buffer: bytes | memoryview) -> tuple[str, str]:
    model_hash = hashlib.sha256(buffer).hexdigest()
    legacy_hash = hashlib.sha256(buffer[LEGACY_HASH_START:LEGACY_HASH_END]).hexdigest()[:8]
    return model_hash, legacy_hash


def file_tensor_hashes(path: Path, chunk: int = 1 << 20) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` of a safetensors file on disk, read in chunks."""
    digest = hashlib.sha256()
    legacy = hashlib.sha256()
    with open(path, "rb") as fh:
        header = fh.read(8)
        if len(header) != 8:
            raise UserError(f"{Path(path).name} is not a safetensors file; choose a .safetensors LoRA file.")
        (header_len,) = struct.unpack("<Q", header)
        fh.seek(8 + header_len)
        offset = 0
        while block := fh.read(chunk):
            digest.update(block)
            lo = max(LEGACY_HASH_START - offset, 0)
            hi = min(LEGACY_HASH_END - offset, len(block))
            if lo < hi:
                legacy.update(block[lo:hi])
            offset += len(block)
    return digest.hexdigest(), legacy.hexdigest()[:8]


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (on CPU) and metadata of a LoRA file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"The LoRA file {path} does not exist; check the path.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - safe_open is not iterable
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise UserError(f"{path.name} is not a readable safetensors file ({exc}); choose another file.") from exc
    return tensors, metadata
