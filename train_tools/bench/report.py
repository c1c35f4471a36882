"""What a run measured (``BenchResult``) and how it is printed: the Markdown table of a run, the summary of
several, the environment line, and the known GPUs' peak rates behind the MFU figure."""

from __future__ import annotations

import math
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .presets import BenchSpec

# Dense (no sparsity) bf16/fp16 tensor-core peaks with fp32 accumulation, in TFLOPS, from the vendors'
# data sheets: (substrings the device name must hold, substrings it must not hold, label, TFLOPS).
PEAK_TFLOPS: tuple[tuple[tuple[str, ...], tuple[str, ...], str, float], ...] = (
    (("H100", "PCIE"), (), "H100 PCIe", 756.0),
    (("H100",), ("NVL", "PCIE"), "H100 SXM", 989.0),
    (("H200",), ("NVL",), "H200", 989.0),
    (("A100",), (), "A100", 312.0),
    (("L40S",), (), "L40S", 362.0),
    (("RTX 4090",), (), "RTX 4090", 165.0),
    (("RTX 3090",), ("TI",), "RTX 3090", 71.0),
)


def peak_tflops(device_name: str) -> tuple[str, float] | None:
    """(label, dense bf16 TFLOPS) of a known GPU, or None: an unknown GPU gets no MFU rather than a guess."""
    name = device_name.upper()
    for needed, excluded, label, tflops in PEAK_TFLOPS:
        if all(n in name for n in needed) and not any(x in name for x in excluded):
            return label, tflops
    return None


@dataclass
class BenchResult:
    spec: BenchSpec
    device_name: str = ""
    step_s: float = math.nan  # steady-state mean
    step_median_s: float = math.nan
    step_max_s: float = math.nan
    first_step_s: float = math.nan
    load_s: float = math.nan
    latents_s: float = math.nan
    text_cache_s: float = math.nan
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    peak_rss: int | None = None
    phases_ms: dict[str, float] = field(default_factory=dict)
    instrumented_step_ms: float = math.nan
    phase_steps_run: int = 0
    bare_step_s: float = math.nan  # mean
    bare_median_s: float = math.nan
    flops_per_step: float | None = None
    peak: tuple[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def steps_per_s(self) -> float:
        return 1.0 / self.step_s if self.step_s > 0 else math.nan

    @property
    def images_per_s(self) -> float:
        return self.steps_per_s * self.spec.batch

    @property
    def overhead(self) -> float:
        """Median trainer step over median bare step: medians, so one slow step (another process, a page
        fault) moves neither."""
        return self.step_median_s / self.bare_median_s if self.bare_median_s > 0 else math.nan

    def mfu(self, step_s: float) -> float | None:
        if self.flops_per_step is None or self.peak is None or not step_s > 0:
            return None
        return self.flops_per_step / step_s / (self.peak[1] * 1e12)


def _dtype_label(mixed_precision: str) -> str:
    if mixed_precision == "no":
        return "fp32 (frozen weights and LoRA weights)"
    return f"{mixed_precision} autocast, frozen weights {mixed_precision}, LoRA weights fp32"


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def _num(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _flops(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} FLOP"


def format_result(r: BenchResult) -> str:
    """One Markdown table (and the phase table) for a run."""
    s = r.spec
    lines = [f"### {s.title}", ""]
    if r.error is not None:
        return "\n".join(lines + [f"Not measured: {r.error}", ""])
    rows: list[tuple[str, str]] = [
        ("device", f"{r.device_name} ({s.device})"),
        ("dtype", _dtype_label(s.mixed_precision)),
        ("resolution", f"{s.resolution}x{s.resolution}"),
        ("batch size", str(s.batch)),
        ("steps/s (steady state)", _num(r.steps_per_s, 3)),
        ("images/s", _num(r.images_per_s, 3)),
        (
            "step time mean / median / max",
            (
                f"{_num(r.step_s * 1000, 1)} / {_num(r.step_median_s * 1000, 1)} / "
                f"{_num(r.step_max_s * 1000, 1)} ms over {s.steps} steps"
            ),
        ),
        (
            "time to first step",
            (
                f"{_num(r.first_step_s, 2)} s (model load {_num(r.load_s, 2)} s, latent caching "
                f"{_num(r.latents_s, 2)} s, text caching {_num(r.text_cache_s, 2)} s)"
            ),
        ),
    ]
    if r.peak_allocated is not None:
        rows.append(("peak memory", f"GPU {_gib(r.peak_allocated)} allocated, {_gib(r.peak_reserved)} reserved"))
    else:
        rows.append(("peak memory", f"process RSS {_gib(r.peak_rss)}"))
    rows += [
        (
            "bare UNet fwd+bwd (bound)",
            (f"{_num(r.bare_step_s * 1000, 1)} / {_num(r.bare_median_s * 1000, 1)} ms mean / median"),
        ),
        (
            "trainer overhead",
            (
                f"{_num(r.overhead, 3)}x the bound, median step over median bare step "
                f"({_num((r.overhead - 1) * 100, 1)}% over)"
            ),
        ),
        ("model FLOPs/step", f"{_flops(r.flops_per_step)} (UNet fwd+bwd, no recomputation)"),
    ]
    mfu, bare_mfu = r.mfu(r.step_s), r.mfu(r.bare_step_s)
    if mfu is not None and bare_mfu is not None and r.peak is not None:
        rows.append(
            (
                "MFU",
                (
                    f"{mfu * 100:.1f}% (bare UNet {bare_mfu * 100:.1f}%) of {r.peak[1]:g} TFLOPS "
                    f"({r.peak[0]}, dense bf16/fp16)"
                ),
            )
        )
    elif s.device.startswith("cuda"):
        rows.append(("MFU", "n/a (peak rate of this GPU unknown)"))
    lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    total = r.instrumented_step_ms
    lines += [
        (f"Step phases (over {r.phase_steps_run} more steps, timed phase by phase with a sync at each boundary):"),
        "",
        "| phase | ms/step | share |",
        "|---|---|---|",
    ]
    other = total - sum(r.phases_ms.values())
    for name, ms in [*r.phases_ms.items(), ("other (bookkeeping, logging)", other)]:
        lines.append(f"| {name} | {_num(ms, 2)} | {_num(ms / total * 100, 1)}% |")
    lines.append(f"| total | {_num(total, 2)} | 100% |")
    lines += [""] + [f"- {note}" for note in r.notes] + ([""] if r.notes else [])
    return "\n".join(lines)


def format_summary(results: Sequence[BenchResult]) -> str:
    lines = [
        "### Summary",
        "",
        "| run | steps/s | images/s | overhead | MFU | peak memory |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.error is not None:
            lines.append(f"| {r.spec.title} | not measured: {r.error[:80]} | | | | |")
            continue
        mfu = r.mfu(r.step_s)
        memory = _gib(r.peak_allocated) if r.peak_allocated is not None else f"RSS {_gib(r.peak_rss)}"
        lines.append(
            f"| {r.spec.title} | {_num(r.steps_per_s, 3)} | {_num(r.images_per_s, 3)} | "
            f"{_num(r.overhead, 3)}x | {'n/a' if mfu is None else f'{mfu * 100:.1f}%'} | {memory} |"
        )
    return "\n".join(lines + [""])


def environment_line() -> str:
    import diffusers

    parts = [
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"diffusers {diffusers.__version__}",
        f"{torch.get_num_threads()} CPU threads",
        platform.platform(),
    ]
    return "Environment: " + ", ".join(parts)
