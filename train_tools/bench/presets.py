"""What a benchmark run is (``BenchSpec``: model, resolution, batch, precision, optimizer, flags), the
presets' runs, and the command line's flags laid over them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import NETWORK_TYPES, TrainConfig
from ..errors import UserError

PRESETS = ("cpu-tiny", "cpu-precision", "cpu-networks", "gpu-sd15", "gpu-sdxl", "gpu-networks")
FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark run."""

    family: str = "sd1"
    size: str = "tiny"  # "tiny" (demo model) or "full" (published architecture, random weights)
    resolution: int = 128
    batch: int = 2
    gradient_checkpointing: bool = False
    optimizer: str = field(default_factory=lambda: TrainConfig().optimizer)  # the tab's default
    mixed_precision: str = "no"
    steps: int = 20
    warmup: int = 3
    phase_steps: int = 10
    compile: bool = False
    channels_last: bool = False
    train_text_encoder: bool = False
    network_dim: int = 128
    network_type: str = "lora"
    flat: bool = True  # LoRA weights laid out flat for the optimizers that allow it (flat_params.py)
    device: str = "cpu"

    @property
    def title(self) -> str:
        parts = [
            f"{self.family} {self.size}",
            f"{self.resolution}x{self.resolution}",
            f"batch {self.batch}",
            _precision_label(self.mixed_precision),
            f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}",
            self.optimizer,
        ]
        if self.network_type != "lora":
            parts.append(self.network_type)
        parts += [
            flag
            for flag, on in (
                ("torch.compile", self.compile),
                ("channels_last", self.channels_last),
                ("text encoder trained", self.train_text_encoder),
                ("LoRA weights as separate tensors", not self.flat),
            )
            if on
        ]
        return " · ".join(parts)


def preset_specs(preset: str, device: str) -> list[BenchSpec]:
    """The runs of a preset: the CPU one, SD1.5 at 512 (batch 1/4, checkpointing off/on, and batch 1 with
    checkpointing and AdamW8bit), SDXL at 1024."""
    gpu_precision = _gpu_precision() if device.startswith("cuda") else "no"
    if preset == "cpu-tiny":
        return [BenchSpec(family="sd1", size="tiny", resolution=128, batch=2, device=device, steps=20)]
    if preset == "cpu-precision":
        return cpu_precision_specs(device)
    if preset in ("cpu-networks", "gpu-networks"):
        return network_type_specs(device, gpu=preset == "gpu-networks")
    if preset == "gpu-sd15":
        runs = [
            BenchSpec(
                family="sd1",
                size="full",
                resolution=512,
                batch=b,
                gradient_checkpointing=gc_on,
                mixed_precision=gpu_precision,
                device=device,
                steps=30,
            )
            for b in (1, 4)
            for gc_on in (False, True)
        ]
        # The low-VRAM set-up the memory target is about: batch 1, checkpointing, an 8-bit optimizer.
        return runs + [dataclasses.replace(runs[1], optimizer="AdamW8bit")]
    if preset == "gpu-sdxl":
        return [
            BenchSpec(
                family="sdxl",
                size="full",
                resolution=1024,
                batch=b,
                gradient_checkpointing=gc_on,
                mixed_precision=gpu_precision,
                device=device,
                steps=20,
            )
            for b, gc_on in ((1, False), (1, True), (4, True))
        ]
    raise UserError(f"Unknown preset '{preset}'; choose one of {', '.join(PRESETS)}.")


def network_type_specs(device: str, gpu: bool) -> list[BenchSpec]:
    """Each network type at the same dim: the tiny model on the CPU, SD1.5 at 512 (batch 1, checkpointing) on a
    GPU. LoCon adds the convolutions at the network's dim; LoKr uses LyCORIS' default factor."""
    if gpu:
        base = BenchSpec(
            family="sd1",
            size="full",
            resolution=512,
            batch=1,
            gradient_checkpointing=True,
            mixed_precision=_gpu_precision(),
            device=device,
            steps=20,
            network_dim=32,
        )
    else:
        base = BenchSpec(family="sd1", size="tiny", resolution=128, batch=2, device=device, steps=20, network_dim=32)
    return [dataclasses.replace(base, network_type=kind) for kind in NETWORK_TYPES]


def cpu_precision_specs(device: str) -> list[BenchSpec]:
    """Is mixed precision worth it on this CPU? The tiny demo model in fp32, bf16 and fp16, and the full SD1.5
    layout at 256 px in fp32 and bf16 (fp16, emulated on most CPUs, would take minutes a step there). bf16 runs
    where the CPU computes it (AVX512-BF16 or AMX); the trainer then offers it to CPU users."""
    from ..training.precision import cpu_has_bf16

    precisions = ["no", "bf16", "fp16"] if cpu_has_bf16() else ["no", "fp16"]
    tiny = BenchSpec(family="sd1", size="tiny", resolution=128, batch=2, device=device, steps=20)
    full = BenchSpec(
        family="sd1", size="full", resolution=256, batch=1, device=device, steps=5, warmup=2, phase_steps=2
    )
    runs = [dataclasses.replace(tiny, mixed_precision=p) for p in precisions]
    return runs + [dataclasses.replace(full, mixed_precision=p) for p in precisions if p != "fp16"]


def _gpu_precision() -> str:
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"


def _precision_label(mixed_precision: str) -> str:
    return "fp32" if mixed_precision == "no" else f"{mixed_precision} autocast"


def apply_overrides(specs: list[BenchSpec], overrides: dict[str, Any]) -> list[BenchSpec]:
    """The preset's runs with the flags given on the command line; runs that become equal are run once."""
    out: list[BenchSpec] = []
    for spec in specs:
        changed = dataclasses.replace(spec, **overrides)
        if changed not in out:
            out.append(changed)
    return out
