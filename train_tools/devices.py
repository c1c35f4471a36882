"""Which device a run trains on, spelled one way, and which physical card that is.

``cpu``, ``cpu:0`` and ``CPU`` are one CPU; ``cuda`` and ``cuda:0`` one GPU, named by its UUID when torch
sees it (``CUDA_VISIBLE_DEVICES`` gives one card different indices in different processes). The device lock
(``devicelock.py``) names its files after ``device_key``.
"""

from __future__ import annotations

import os
import re
import sys

from .errors import UserError

#: torch's device types; a name outside them is a typo (torch itself is asked when it is loaded).
_DEVICE_TYPES = frozenset(
    {
        "cpu",
        "cuda",
        "mps",
        "xpu",
        "hip",
        "npu",
        "hpu",
        "mtia",
        "xla",
        "ipu",
        "vulkan",
        "privateuseone",
        "maia",
        "meta",
        "lazy",
        "ve",
        "fpga",
        "opengl",
        "opencl",
        "ideep",
        "mkldnn",
    }
)
_SPELLING = re.compile(r"([a-z][a-z0-9_]*)(?::(\d{1,4}))?")


def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        return default


def _torch_knows(text: str) -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def _parse(device: str) -> tuple[str, int | None]:
    """(type, index) of a device string; a UserError with a sentence when it names no device."""
    text = str(device).strip().lower()
    match = _SPELLING.fullmatch(text)
    if match is None or (match.group(1) not in _DEVICE_TYPES and not _torch_knows(text)):
        shown = "".join(c for c in str(device).strip()[:40] if c.isprintable())
        raise UserError(
            f"'{shown}' is not a device to train on; write cpu, cuda (the first GPU), cuda:1 (the "
            "second), mps (a Mac's GPU), or leave it empty to use the GPU when there is one."
        )
    return match.group(1), int(match.group(2)) if match.group(2) is not None else None


def _cuda_count() -> int | None:
    """How many GPUs torch sees; None when it sees none (no CUDA build, no driver) or is not installed."""
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else None
    except (ImportError, RuntimeError, AssertionError):
        return None


def device_name(device: str | None) -> str:
    """The device a run will use, spelled one way: ``cpu``, ``cuda:0``, ``cuda:1``, ``mps``...

    ``None`` (or empty) means what the trainer would pick (the first CUDA GPU when there is one); a bare
    ``cuda`` is the GPU of this process (``LOCAL_RANK`` under ``accelerate launch``). Every ``cpu:N`` is the
    one CPU. A name that is no device, or a GPU this computer does not have, is a UserError.
    """
    if device is None or not str(device).strip():
        try:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            device = "cpu"
    kind, index = _parse(str(device))
    if kind in ("cpu", "mps"):  # one of each per computer
        return kind
    if index is None:
        index = env_int("LOCAL_RANK", 0)
    if kind == "cuda":
        count = _cuda_count()
        if count is not None and index >= count:
            raise UserError(
                f"There is no GPU cuda:{index}: this computer has {count} (cuda:0"
                f"{f' to cuda:{count - 1}' if count > 1 else ''}); pick one of them."
            )
    return f"{kind}:{index}"


def _gpu_uuid(index: int) -> str | None:
    """The UUID of the ``index``-th GPU this process sees, or None when torch cannot tell."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    except (ImportError, RuntimeError, AssertionError, AttributeError):
        return None
    return str(uuid) if uuid else None


def physical_gpu(index: int) -> str:
    """The card behind ``cuda:<index>`` of this process, the same in every process: ``uuid-<uuid>`` when
    torch knows it, else its index before ``CUDA_VISIBLE_DEVICES`` renumbered it (or its UUID from there)."""
    uuid = _gpu_uuid(index)
    if uuid is None and "CUDA_VISIBLE_DEVICES" in os.environ:
        visible = [entry.strip() for entry in os.environ["CUDA_VISIBLE_DEVICES"].split(",")]
        if index < len(visible) and visible[index]:
            entry = visible[index].lower()
            if entry.isdigit():
                return str(int(entry))
            uuid = entry[4:] if entry.startswith("gpu-") else entry
    if uuid is None:
        return str(index)
    return "uuid-" + re.sub(r"[^a-z0-9-]", "", uuid.lower())[:80]


def device_key(device: str | None) -> str:
    """The device as a file name: ``cpu``, ``mps``, ``cuda-uuid-<uuid>`` or ``cuda1``, ``xpu0``."""
    name = device_name(device)
    if name.startswith("cuda:"):
        card = physical_gpu(int(name.split(":")[1]))
        return f"cuda-{card}" if card.startswith("uuid-") else f"cuda{card}"
    return re.sub(r"[^a-z0-9_]", "", name) or "cpu"
