"""How long a run of the tiny demo model takes on this machine, told before Begin Train.

The figure comes from this machine, not from a table: the demo UNet (the tiny published layout, random
weights, built in milliseconds) with a LoRA of the run's rank trains a few steps at the run's batch and
resolution, and samples a few steps as the preview grid will; the run's step count times those times, plus
what loading, preparing the pictures and caching cost besides, is the estimate. Real checkpoints get no
estimate here (measuring them would mean loading them); the tab's ETA during training covers them.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import TrainConfig

log = logging.getLogger(__name__)

# What a demo run costs besides its steps: on a quiet 2-core AMD EPYC, preparing 12 pictures, loading the model
# and caching latents and text took 0.9 s before the first step (the run's log); doubled, as the estimate should
# rather be long than short.
FIXED_SECONDS = 2.0
# The text encoder trained beside the UNet: measured there, the bare UNet's step (LoRA, AdamW) came out 15%
# slower than the trainer's whole step with the text encoder, so only a little is added for it.
TEXT_ENCODER_FACTOR = 1.1
# Issue 16's promise: the whole demo flow (prepare, train, the preview grid) within 3 minutes on a 2-core CPU.
DEMO_BUDGET_S = 180.0
# On a machine too slow for the demo's epochs within the budget, the run takes fewer, never fewer than these: at 10
# epochs the cross shows in 43% of the concept prompts at weight 1, at 20 in 87% (bench_quality, BENCHMARKS.md).
MIN_DEMO_EPOCHS = 10
TIMED_STEPS = 5  # the median of these: one step slowed by something else running does not count
# One measurement at a time: two at once would each slow the other down (and measure that).
_MEASURING = threading.Lock()


@dataclass(frozen=True)
class Estimate:
    seconds: float  # the whole run: preparing, training and the preview grid
    steps: int  # training steps
    grid_pictures: int  # pictures of the preview grid at the end (0 without one)

    def sentence(self) -> str:
        grid = f" and a preview grid of {self.grid_pictures} pictures" if self.grid_pictures else ""
        return f"about {_round_up(self.seconds)} s on this machine ({self.steps} steps{grid})"


def training_steps(config: TrainConfig, pictures: int, class_pictures: int = 0) -> int:
    """The run's steps: every picture ``repeats`` times per epoch, in batches (one bucket's partial batch
    per epoch counted on top, as aspect-ratio buckets may leave one); with class pictures, as many of them
    again (the trainer draws one per training picture seen), in batches of their own."""
    from ..data.items import auto_repeats

    pictures = max(1, pictures)
    repeats = config.repeats or auto_repeats(pictures)
    seen = pictures * repeats * (2 if class_pictures else 1)
    per_epoch = math.ceil(seen / config.batch_size) + (1 if config.batch_size > 1 else 0)
    return per_epoch * config.epochs


def grid_pictures(config: TrainConfig) -> int:
    """The preview grid's pictures: each saved file at each weight, plus the base model's column."""
    if not config.preview_at_end:
        return 0
    from ..previews.settings import DEFAULT_WEIGHTS

    files = config.epochs // config.save_every_n_epochs + (0 if config.epochs % config.save_every_n_epochs == 0 else 1)
    return files * (len(DEFAULT_WEIGHTS) + 1)


def estimate_demo_run(
    config: TrainConfig, pictures: int, device: str | None = None, class_pictures: int = 0
) -> Estimate:
    """The time of a demo-model run of ``config`` on ``pictures`` pictures (and ``class_pictures``) here (see
    the module's note); a version with no pictures yet counts the demo pictures it is about to get."""
    from ..demo_settings import DEMO_CLASS_PICTURES, DEMO_PICTURES

    if not pictures:
        pictures, class_pictures = DEMO_PICTURES, DEMO_CLASS_PICTURES
    chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with _MEASURING:
        step_s, sample_s = _measured_seconds(
            int(config.resolution),
            int(config.batch_size),
            int(config.network_dim),
            (config.conv_rank() or (0, 0.0))[0],
            bool(config.train_text_encoder),
            chosen,
            str(config.network_type),
        )
    steps = training_steps(config, pictures, class_pictures)
    grid = grid_pictures(config)
    from ..previews.settings import PreviewSettings

    sampling = grid * PreviewSettings().steps * sample_s
    return Estimate(FIXED_SECONDS + steps * step_s + sampling, steps, grid)


def fit_demo_epochs(
    config: TrainConfig, pictures: int, device: str | None = None, class_pictures: int = 0
) -> tuple[dict[str, int], Estimate]:
    """The demo settings fitted to this machine: ``config``'s epochs when the run takes at most
    ``DEMO_BUDGET_S`` here, else the most that fit (at least ``MIN_DEMO_EPOCHS``), the file saved at the end as
    before. Returns the changes (none when it fits) and the estimate of the run with them."""
    found = estimate_demo_run(config, pictures, device, class_pictures)
    epochs = int(config.epochs)
    changes: dict[str, int] = {}
    while found.seconds > DEMO_BUDGET_S and epochs > MIN_DEMO_EPOCHS:
        epochs -= 1
        changes = {"epochs": epochs}
        if config.save_every_n_epochs >= config.epochs:
            changes["save_every_n_epochs"] = epochs
        found = estimate_demo_run(config.updated(changes), pictures, device, class_pictures)
    return changes, found


@functools.cache
def _measured_seconds(
    resolution: int, batch: int, rank: int, conv_rank: int, train_te: bool, device: str, network_type: str = "lora"
) -> tuple[float, float]:
    """(a training step, a sampling step) of the demo UNet with a rank-``rank`` network of ``network_type``
    (with the convolutions at rank ``conv_rank``, 0 = none), in seconds, measured."""
    from ..models.configs import build_unet, spec
    from ..networks.targets import unet_target_modules
    from ..networks.types import attach_network, network_parameters

    target = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = build_unet(spec("sd1", tiny=True)).to(target)
        unet.requires_grad_(False)
        conv = (conv_rank, conv_rank / 2) if conv_rank > 0 else None
        attach_network(unet, unet_target_modules(unet, conv=conv is not None), network_type, rank, rank / 2, conv)
        params = network_parameters(unet)
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        side = max(8, resolution // 8)
        latents = torch.randn(batch, 4, side, side, device=target)
        context = torch.randn(batch, 77, int(unet.config.cross_attention_dim), device=target)
        timesteps = torch.randint(0, 1000, (batch,), device=target)

        def train_step() -> None:
            loss = unet(latents, timesteps, context).sample.float().pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def sample_step() -> None:  # the prompt and the negative prompt in one batch, as the previewer does
            with torch.no_grad():
                unet(latents[:1].repeat(2, 1, 1, 1), timesteps[:1].repeat(2), context[:1].repeat(2, 1, 1))

        step_s = _timed(train_step, target)
        sample_s = _timed(sample_step, target)
    if train_te:
        step_s *= TEXT_ENCODER_FACTOR
    log.debug("Demo UNet on %s: %.1f ms a training step, %.1f ms a sampling step", device, step_s * 1e3, sample_s * 1e3)
    return step_s, sample_s


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    fn()  # warm-up: the first call allocates and picks kernels
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(TIMED_STEPS):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _round_up(seconds: float) -> int:
    """Seconds shown as a person would say them: to the next 5 s under a minute, the next 10 s above."""
    step = 5 if seconds < 60 else 10
    return int(math.ceil(seconds / step) * step)
