"""Timing the real trainer without changing its code: a stamp per step (``BenchReporter``), the phases of
a step (``PhaseTimer``, wrapping the methods a step calls), and the seconds of any function or method."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..progress import Reporter, StepInfo

log = logging.getLogger(__name__)

PHASES = ("data", "text encoder", "UNet forward", "backward", "optimizer")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Times named phases by wrapping the methods the training step calls (on the instances only, so the
    trainer's code is unchanged); ``restore`` puts the originals back."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._patched: list[tuple[Any, str, bool, Any]] = []

    def wrap(self, obj: Any, name: str, phase: str) -> None:
        original = getattr(obj, name)
        own = name in vars(obj)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            sync(self.device)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sync(self.device)
                self.totals[phase] += time.perf_counter() - start

        setattr(obj, name, timed)
        self._patched.append((obj, name, own, vars(obj).get(name) if own else None))

    def install(self, trainer: Any) -> None:
        for name in ("latents_for", "sample_noise", "sample_timesteps"):
            self.wrap(trainer, name, "data")
        self.wrap(trainer, "text_for", "text encoder")
        self.wrap(trainer, "loss", "UNet forward")
        self.wrap(trainer.accelerator, "backward", "backward")
        self.wrap(trainer, "clip_gradients", "optimizer")
        self.wrap(trainer, "optimizer_step", "optimizer")
        self.wrap(trainer.optimizer, "zero_grad", "optimizer")
        self.wrap(trainer.lr_scheduler, "step", "optimizer")

    def restore(self) -> None:
        for obj, name, own, original in reversed(self._patched):
            if own:
                setattr(obj, name, original)
            else:
                vars(obj).pop(name, None)
        self._patched.clear()


class BenchReporter(Reporter):
    """Stamps every step, switches the phase timers on after the timed steps."""

    def __init__(self, on_step: Callable[[int], None]) -> None:
        self.stamps: list[float] = []  # when each step ended
        self.resumed: list[float] = []  # when the trainer got control back after it (``on_step`` excluded)
        self.on_step = on_step

    def start(self, total_steps: int, total_epochs: int) -> None:
        log.debug("Training %d steps", total_steps)

    def step(self, info: StepInfo) -> None:
        self.stamps.append(time.perf_counter())
        self.on_step(info.step)
        self.resumed.append(time.perf_counter())

    def step_seconds(self, step: int) -> float:
        """Seconds of training step ``step`` (1-based) alone, without what ``on_step`` did before it."""
        return self.stamps[step - 1] - self.resumed[step - 2]

    def saved(self, path: Path, epoch: int) -> None:
        log.debug("saved %s", path.name)

    def message(self, text: str) -> None:
        log.debug("%s", text)


def _timing(original: Callable[..., Any], sink: list[float]) -> Callable[..., Any]:
    """``original`` that appends the seconds of each call to ``sink``."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - start)

    return timed


@contextlib.contextmanager
def timed_function(module: Any, name: str, sink: list[float]) -> Iterator[None]:
    """Time every call of ``module.name`` (a module-level function looked up at call time)."""
    original = getattr(module, name)
    setattr(module, name, _timing(original, sink))
    try:
        yield
    finally:
        setattr(module, name, original)


def timed_method(obj: Any, name: str, sink: list[float]) -> None:
    setattr(obj, name, _timing(getattr(obj, name), sink))
