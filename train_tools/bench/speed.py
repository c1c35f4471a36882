"""``python -m train_tools.bench.speed``: how fast the trainer trains, and how far it is from the bare UNet.

Each run trains a fresh version of generated square pictures with the real ``Trainer`` (the same code as the
tab and the command line) and prints one table:

* steps/s and images/s in steady state (after a few warm-up steps), the median and slowest step;
* the time to the first step, model loading and latent caching included;
* peak memory: torch's max allocated/reserved on a GPU, the process's peak RSS on the CPU;
* a per-phase breakdown of a step (data, text encoder, UNet forward, backward, optimizer), taken over a few
  extra steps with the phases timed one by one (synchronising the GPU at each boundary, so these steps are
  not part of the steady-state figure);
* the bound: the same UNet (with the same LoRA, precision and checkpointing) doing only forward + backward,
  one step of it between every two timed training steps,
  on the same inputs, and the trainer's step time over it, which is the trainer's overhead;
* on a GPU, the model FLOPs of a step (``torch.utils.flop_counter``, without the recomputation of gradient
  checkpointing) and the achieved fraction of the GPU's dense bf16/fp16 peak (MFU) when the GPU is known.

Models: ``tiny`` is the demo model (a second to build, runs on a CPU); ``full`` is the published
architecture with random weights (no download), written once to the work folder and reused.

This module is the command line (flags, presets chosen, tables printed); the runs are ``presets``, a run is
measured by ``measure`` on what ``workload`` builds, with ``timing`` and the bound of ``bare_unet``, and
``report`` prints it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..config import NETWORK_TYPES, OPTIMIZERS
from ..errors import UserError
from .measure import run_one
from .presets import FAMILIES, PRESETS, BenchSpec, apply_overrides, preset_specs
from .report import environment_line, format_result, format_summary

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train_tools.bench.speed",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset",
        choices=PRESETS,
        help="cpu-tiny (default without a GPU), cpu-precision (fp32 against bf16 and fp16 on this CPU: the tiny "
        "model, and SD1.5 at 256), cpu-networks / gpu-networks (each network type: the tiny model / SD1.5 at "
        "512), gpu-sd15 (default with "
        "one: SD1.5 at 512, batch 1 and 4, checkpointing off and on, and batch 1 with checkpointing and "
        "AdamW8bit) or gpu-sdxl (SDXL at 1024)",
    )
    p.add_argument("--family", choices=FAMILIES)
    p.add_argument(
        "--model-size",
        dest="size",
        choices=("tiny", "full"),
        help="tiny demo model or the full architecture with random weights",
    )
    p.add_argument("--resolution", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--mixed-precision", choices=("fp16", "bf16", "no"))
    p.add_argument("--steps", type=int, help="timed steady-state steps (after the warm-up)")
    p.add_argument("--warmup", type=int, help="steps before the timing starts (default 3)")
    p.add_argument("--phase-steps", type=int, help="extra steps timed phase by phase (default min(10, steps))")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the UNet")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--train-text-encoder",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also train the text encoder (default: frozen, its outputs cached)",
    )
    p.add_argument("--network-dim", type=int)
    p.add_argument("--network-type", choices=NETWORK_TYPES)
    p.add_argument(
        "--flat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="lay the LoRA weights out in one tensor per group where the optimizer allows it (default; "
        "--no-flat keeps them separate, to measure what the layout gives)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "train_tools_bench",
        help="where the models are kept between runs (default: %(default)s)",
    )
    p.add_argument("--keep", action="store_true", help="keep each run's data folder")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def specs_from_args(args: argparse.Namespace) -> list[BenchSpec]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("gpu-sd15" if device.startswith("cuda") else "cpu-tiny")
    if preset.startswith("gpu") and not device.startswith("cuda"):
        raise UserError(f"The {preset} preset needs a CUDA GPU; use --preset cpu-tiny on this machine.")
    names = (
        "family",
        "size",
        "resolution",
        "batch",
        "gradient_checkpointing",
        "optimizer",
        "mixed_precision",
        "steps",
        "warmup",
        "phase_steps",
        "compile",
        "channels_last",
        "train_text_encoder",
        "network_dim",
        "network_type",
        "flat",
    )
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    overrides["device"] = device
    specs = apply_overrides(preset_specs(preset, device), overrides)
    fixed = []
    for spec in specs:
        if args.phase_steps is None:
            spec = dataclasses.replace(spec, phase_steps=max(1, min(10, spec.steps)))
        if spec.steps < 1 or spec.warmup < 1 or spec.batch < 1:
            raise UserError("--steps, --warmup and --batch must be at least 1.")
        fixed.append(spec)
    return fixed


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    level = logging.DEBUG if args.verbose else logging.INFO
    log.setLevel(level)
    logging.getLogger("train_tools.bench").setLevel(level)  # the run's own modules (measure, workload, timing)
    if args.verbose:
        logging.getLogger("train_tools").setLevel(logging.INFO)
    out = sys.stdout
    try:
        specs = specs_from_args(args)
        args.work_dir.mkdir(parents=True, exist_ok=True)
        out.write(f"## Train Tools benchmark, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n\n{environment_line()}\n\n")
        out.flush()
        results = []
        for index, spec in enumerate(specs, start=1):
            log.info("Run %d of %d: %s", index, len(specs), spec.title)
            result = run_one(spec, args.work_dir, keep=args.keep)
            results.append(result)
            out.write(format_result(result) + "\n")
            out.flush()
        if len(results) > 1:
            out.write(format_summary(results) + "\n")
    except UserError as exc:
        log.error("Error: %s", exc)
        return 2
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
