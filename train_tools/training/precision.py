"""Which mixed precision a run trains in on its device, and what accelerate needs for it on a CPU.

On a CUDA GPU accelerate does everything: bf16 or fp16 autocast, and for fp16 a gradient scaler. On a CPU
accelerate autocasts bf16 but ignores fp16 (no autocast, no scaler), although torch (2.4 and later) does fp16
autocast and loss scaling there too (``torch.amp.GradScaler("cpu")``). ``enable_cpu_fp16`` gives accelerate
the two, so the CPU runs the very code a GPU runs: the same ``autocast()``, ``backward`` (scaled), gradient
unscaling before clipping, the scaler's skip of a step whose gradients overflowed, and its saved state.

Which precision a CPU trains in: a CPU without bf16 (or fp16) instructions emulates that type, slower than
fp32, so by default (``exact=False``) a run asks for what the CPU does natively: fp16 becomes bf16 on a CPU
with AVX512-BF16 or AMX and fp32 elsewhere; bf16 becomes fp32 without them. ``exact=True`` (tests, the
benchmark) trains in the precision asked whenever this torch can, to run and measure that path.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


def _cpu_flag(name: str) -> bool:
    probe = getattr(torch.cpu, name, None)  # private helpers of torch.cpu (2.1+), absent in older ones
    try:
        return bool(probe()) if callable(probe) else False
    except RuntimeError:
        return False


def cpu_has_bf16() -> bool:
    """The CPU computes bf16 natively (AVX512-BF16, or AMX tiles)."""
    return _cpu_flag("_is_avx512_bf16_supported") or _cpu_flag("_is_amx_tile_supported")


def cpu_has_fp16() -> bool:
    """The CPU computes fp16 natively (AVX512-FP16 or AMX-FP16)."""
    return _cpu_flag("_is_avx512_fp16_supported") or _cpu_flag("_is_amx_fp16_supported")


@functools.cache
def cpu_fp16_failure() -> str | None:
    """Why this torch cannot train in fp16 on a CPU (None when it can): fp16 autocast on the CPU and
    ``torch.amp.GradScaler("cpu")`` came with torch 2.4. Tried, rather than read from the version number."""
    try:
        scaler = torch.amp.GradScaler("cpu")
        weight = torch.nn.Parameter(torch.ones(4, 4))
        with torch.autocast("cpu", dtype=torch.float16):
            out = torch.ones(2, 4) @ weight
        if out.dtype != torch.float16:
            return f"torch {torch.__version__} does not autocast to fp16 on a CPU"
        scaler.scale(out.float().sum()).backward()
        scaler.unscale_(torch.optim.SGD([weight], lr=0.1))
    except (AttributeError, RuntimeError, TypeError, ValueError) as exc:
        return f"torch {torch.__version__} cannot train in fp16 on a CPU ({type(exc).__name__}: {exc})"
    return None


def resolve_precision(requested: str, device: torch.device, *, exact: bool = False) -> str:
    """The mixed precision a run asking for ``requested`` trains in on ``device`` ("no" = fp32); each change
    is logged with its reason, and the file's metadata records the result."""
    if requested == "no":
        return "no"
    if device.type == "cuda":
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            log.warning("This GPU cannot do bf16; using fp16 mixed precision instead.")
            return "fp16"
        return requested
    if device.type != "cpu":
        log.warning("%s mixed precision is not supported on %s; training in fp32.", requested, device.type.upper())
        return "no"
    if requested == "fp16":
        failure = cpu_fp16_failure()
        if failure is None and (exact or cpu_has_fp16()):
            return "fp16"
        why = "is not possible: " + failure if failure else "is emulated and slower than fp32"
        if cpu_has_bf16():
            log.warning(
                "fp16 on this CPU %s; training in bf16, which it computes natively (faster, and no loss scaling).", why
            )
            return "bf16"
        log.warning("fp16 on this CPU %s, and it has no bf16 instructions; training in fp32.", why)
        return "no"
    if exact or cpu_has_bf16():
        return "bf16"
    log.warning(
        "This CPU has no bf16 instructions (AVX512-BF16 or AMX), so bf16 would be slower than fp32; training in fp32."
    )
    return "no"


def make_accelerator(precision: str, device: torch.device) -> Any:
    """accelerate's ``Accelerator`` for a run in ``precision`` on ``device``, fp16 on a CPU included.

    accelerate keeps one process-wide state and refuses a second precision (or a CPU after a GPU) in the same
    process "until the runtime restarts"; the app and the WebUI train run after run in one process, with
    whatever precision each asks. A single process owns that state, so it is reset for the new run; a
    launched process of a multi-process run (one run per process) keeps it.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    try:
        accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
    except ValueError as exc:
        if "already been initialized" not in str(exc) or PartialState().num_processes > 1:
            raise
        log.debug("A new accelerate state for this run: %s", exc)
        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
    enable_cpu_fp16(accelerator)
    return accelerator


def enable_cpu_fp16(accelerator: Any) -> None:
    """fp16 on a CPU through accelerate: its autocast and a CPU gradient scaler (see the module's note).

    Call before ``accelerator.prepare(optimizer)``, which hands the scaler to the wrapped optimizer. accelerate
    autocasts only when ``native_amp`` is on, and scales the loss, unscales before clipping and steps through
    the scaler whenever ``scaler`` is set, on any device.
    """
    if accelerator.mixed_precision != "fp16" or accelerator.device.type != "cpu" or accelerator.scaler is not None:
        return
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu")
