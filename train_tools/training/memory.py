"""Running out of memory: telling it from other failures, and what to lower or turn on instead."""

from __future__ import annotations

import torch

from ..config import TrainConfig


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError (any torch), MPS/ROCm's RuntimeError "... out of memory", a host MemoryError."""
    kinds = tuple(
        k
        for k in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
        if isinstance(k, type)
    )
    if isinstance(exc, (MemoryError, *kinds)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def out_of_memory_advice(config: TrainConfig) -> str:
    """What to lower or turn on, from the settings that ran out of memory."""
    lower = [f"the batch size (now {config.batch_size})"] if config.batch_size > 1 else []
    lower += [f"the resolution (now {config.resolution})", f"the network dim (now {config.network_dim})"]
    turn_on = [] if config.gradient_checkpointing else ["gradient checkpointing"]
    if config.optimizer not in ("AdamW8bit", "Lion8bit", "AdaFactor"):
        turn_on.append("an 8-bit optimizer (AdamW8bit)")
    if config.mixed_precision == "no":
        turn_on.append("fp16 or bf16 mixed precision")
    text = "Out of memory: training stopped and its memory was freed. Lower " + _join(lower)
    if turn_on:
        text += ", or turn on " + _join(turn_on)
    return text + "; closing other programs that use the GPU helps too."


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
