"""One benchmark run: a fresh version trained by the real ``Trainer``, its steps, phases, memory, bound
and FLOPs measured into a ``BenchResult``."""

from __future__ import annotations

import contextlib
import gc
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .bare_unet import bare_inputs, bare_step_between, count_flops
from .presets import BenchSpec
from .report import BenchResult, peak_tflops
from .timing import BenchReporter, PhaseTimer, timed_function, timed_method
from .workload import bench_config, ensure_checkpoint, make_version, offline_tokenizer_fallback, plan


def run_one(spec: BenchSpec, work_dir: Path, *, keep: bool = False) -> BenchResult:
    """Train ``spec`` with the real trainer and measure it; errors a user can meet become the result's error."""
    result = BenchResult(spec)
    device = torch.device(spec.device)
    result.device_name = _device_name(device)
    result.peak = peak_tflops(result.device_name) if device.type == "cuda" else None
    ckpt = ensure_checkpoint(spec.family, spec.size, work_dir / "models", spec.device)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work_dir))
    try:
        version = make_version(run_dir, spec)
        with offline_tokenizer_fallback():
            _measure(spec, version, ckpt, device, result)
    except UserError as exc:
        result.error = str(exc)
    except (RuntimeError, MemoryError) as exc:
        from ..training.memory import is_out_of_memory

        if not is_out_of_memory(exc):
            raise
        result.error = f"out of memory ({str(exc).splitlines()[0][:160]})"
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
    return f"{platform.processor() or platform.machine() or 'CPU'}, {torch.get_num_threads()} threads"


def _measure(spec: BenchSpec, version: Any, ckpt: Path, device: torch.device, result: BenchResult) -> None:
    from ..models import loader
    from ..training.trainer import Trainer

    _, repeats, total = plan(spec)
    timed_end = spec.warmup + spec.steps
    timer = PhaseTimer(device)
    trainer_box: list[Any] = []

    bare: list[float] = []

    def on_step(step: int) -> None:
        # Between two training steps, one bare UNet step on the inputs of the step just done: the bound is
        # measured interleaved with the steps it bounds, so both see the same machine (on a shared CPU the
        # load moves by more than the overhead between a run and one taken after it).
        if step < timed_end:
            seconds = bare_step_between(trainer_box[0], captured["args"], device)
            if step >= spec.warmup:
                bare.append(seconds)
        elif step == timed_end:
            timer.install(trainer_box[0])

    reporter = BenchReporter(on_step)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    load_times: list[float] = []
    latent_times: list[float] = []
    text_times: list[float] = []
    start = time.perf_counter()
    trainer = Trainer(
        version, bench_config(spec, repeats), ckpt, reporter=reporter, device=spec.device, run_name="bench"
    )
    trainer.flat_layout = spec.flat
    trainer.exact_precision = True  # measure the precision asked for, also where a CPU emulates it
    trainer_box.append(trainer)
    captured: dict[str, Any] = {}
    original_loss = trainer.loss

    def loss(*args: Any, **kwargs: Any) -> torch.Tensor:
        captured["args"] = args  # the last step's inputs, for the bare UNet bound
        return original_loss(*args, **kwargs)

    trainer.loss = loss  # type: ignore[method-assign]
    timed_method(trainer, "cache_latents", latent_times)
    timed_method(trainer, "cache_text", text_times)
    if spec.channels_last:
        _channels_last_after_prepare(trainer)
    try:
        with timed_function(loader, "load_model", load_times):
            trainer.run()
    finally:
        timer.restore()
    # The training run's peak: read before the bound and the FLOP count (done without checkpointing) run.
    if device.type == "cuda":
        result.peak_allocated = torch.cuda.max_memory_allocated(device)
        result.peak_reserved = torch.cuda.max_memory_reserved(device)
    else:
        result.peak_rss = peak_rss()
    stamps = reporter.stamps
    if len(stamps) < total:
        raise UserError(f"The benchmark run stopped after {len(stamps)} of {total} steps.")
    result.first_step_s = stamps[0] - start
    result.load_s = sum(load_times)
    result.latents_s = sum(latent_times)
    result.text_cache_s = sum(text_times)
    steady = [reporter.step_seconds(step) for step in range(spec.warmup + 1, timed_end + 1)]
    result.step_s = statistics.fmean(steady)
    result.step_median_s = statistics.median(steady)
    result.step_max_s = max(steady)
    phase_steps = result.phase_steps_run = total - timed_end
    result.instrumented_step_ms = (stamps[-1] - stamps[timed_end - 1]) / phase_steps * 1000
    result.phases_ms = {name: seconds / phase_steps * 1000 for name, seconds in timer.totals.items()}

    result.bare_step_s, result.bare_median_s = statistics.fmean(bare), statistics.median(bare)
    unet = trainer.accelerator.unwrap_model(trainer.model.unet)
    inputs = bare_inputs(captured["args"], trainer.weight_dtype)
    try:
        result.flops_per_step = count_flops(unet, inputs, trainer.accelerator.autocast, trainer.trainable)
    except (RuntimeError, NotImplementedError) as exc:  # an op the counter cannot follow: no FLOPs, no MFU
        result.notes.append(f"FLOPs not counted: {str(exc).splitlines()[0][:120]}")
    if not spec.train_text_encoder:
        result.notes.append("text encoder frozen: its outputs are cached before the first step")
    trainer.release_memory()


def _channels_last_after_prepare(trainer: Any) -> None:
    from ..training.flat_params import views_intact

    original = trainer.prepare

    def prepare() -> None:
        original()
        # The frozen weights only: the LoRA weights stay views of their flat tensors (flat_params.py), which
        # are laid out in the weights' logical order anyway.
        kept = [(p, p.data, p.grad.data if p.grad is not None else None) for p in trainer.trainable]
        trainer.accelerator.unwrap_model(trainer.model.unet).to(memory_format=torch.channels_last)
        for p, data, grad in kept:
            p.data = data
            if grad is not None:
                p.grad.data = grad
        if trainer.flat and not all(views_intact(f) for f in trainer.optimized):
            raise RuntimeError("channels_last moved a LoRA weight out of its flat tensor.")

    trainer.prepare = prepare


def peak_rss() -> int | None:
    """The process's peak resident memory in bytes (Linux/macOS), None where the OS does not say."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
