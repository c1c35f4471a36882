"""Progress reporting and interruption for long work (training, preparing, previews).

The trainer reports to a ``Reporter``; the terminal shows a tqdm bar, the tab polls the same numbers, and a
``StopFlag`` set from anywhere (Ctrl-C, the Interrupt button, the WebUI's ``state.interrupted``) makes the work
stop cleanly after the current step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# How long work other than training reports: (done, total) as it goes, e.g. pictures prepared or bytes
# downloaded.
ProgressFn = Callable[[int, int], None]
# The same with what is being done and its unit ("" or "B" for bytes): ``Reporter.task``.
TaskFn = Callable[[str, int, int, str], None]


@dataclass
class StepInfo:
    step: int  # steps done, 1-based after the first step
    total_steps: int
    epoch: int  # the epoch in progress, 1-based
    total_epochs: int
    loss: float
    avg_loss: float  # moving average over recent steps
    lr: float
    steps_per_s: float
    eta_s: float

    def line(self) -> str:
        eta = time.strftime("%H:%M:%S", time.gmtime(max(0.0, self.eta_s)))
        return (
            f"step {self.step}/{self.total_steps}, epoch {self.epoch}/{self.total_epochs}, "
            f"loss {self.avg_loss:.4f}, {self.steps_per_s:.2f} it/s, ETA {eta}"
        )


class Stopped(BaseException):
    """Raised from a progress report when a stop was asked for: work before training (preparing pictures, a
    captioner's download) ends there, before anything is trained. A BaseException, as KeyboardInterrupt is,
    so that the ``except Exception`` around one download or one picture does not swallow it."""


class StopFlag:
    """Set to ask running work to stop after its current step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def request(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    @property
    def requested(self) -> bool:
        return self._event.is_set()


class Reporter:
    """Receives progress; the base class logs. Subclass for a bar, the tab, or the WebUI's shared.state."""

    def start(self, total_steps: int, total_epochs: int) -> None:
        log.info("Training: %d steps over %d epochs", total_steps, total_epochs)

    def step(self, info: StepInfo) -> None:
        pass

    def saved(self, path: Path, epoch: int) -> None:
        log.info("Saved %s (epoch %d)", path, epoch)

    def message(self, text: str) -> None:
        log.info("%s", text)

    def validation(self, step: int, loss: float) -> None:
        """The loss on the held-out pictures (setting ``validation_split``) after ``step``."""
        log.info("Validation loss %.4f after step %d", loss, step)

    def task(self, what: str, done: int, total: int, unit: str = "") -> None:
        """Progress of work before the first step: pictures prepared, a captioner's download (``unit`` "B":
        bytes). Called as it goes, ``done`` reaching ``total`` at the end."""
        if done >= total:
            log.info("%s: %s", what, task_amount(done, total, unit))

    def finish(self) -> None:
        pass


def task_amount(done: int, total: int, unit: str = "") -> str:
    """'3/20', or '12.0/300.0 MB' for bytes."""
    if unit == "B":
        return f"{done / 1e6:.1f}/{total / 1e6:.1f} MB"
    return f"{done}/{total}"


class TerminalReporter(Reporter):
    """A tqdm bar in the terminal: step, epoch, loss, speed, ETA."""

    def __init__(self) -> None:
        self._bar = None
        self._tasks: dict[str, TerminalBar] = {}

    def task(self, what: str, done: int, total: int, unit: str = "") -> None:
        bar = self._tasks.get(what)
        if bar is None:
            bar = self._tasks[what] = TerminalBar(what, unit=unit or "it", unit_scale=unit == "B")
        bar(done, total)
        if done >= total:
            bar.close()
            del self._tasks[what]

    def _close_tasks(self) -> None:
        for bar in self._tasks.values():
            bar.close()
        self._tasks.clear()

    def start(self, total_steps: int, total_epochs: int) -> None:
        from tqdm.auto import tqdm

        self._close_tasks()
        super().start(total_steps, total_epochs)
        self._bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)

    def step(self, info: StepInfo) -> None:
        if self._bar is not None:
            self._bar.n = info.step
            self._bar.set_postfix(epoch=f"{info.epoch}/{info.total_epochs}", loss=f"{info.avg_loss:.4f}", refresh=False)
            self._bar.refresh()

    def saved(self, path: Path, epoch: int) -> None:
        if self._bar is not None:
            self._bar.write(f"saved {path.name} (epoch {epoch})")
        else:
            super().saved(path, epoch)

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            super().message(text)

    def finish(self) -> None:
        self._close_tasks()  # a run stopped while preparing has no training bar, but a task's
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class TerminalBar:
    """A ``ProgressFn`` that draws a tqdm bar in the terminal, made at the first report (so a step that turns
    out to have nothing to do, such as a download already done, draws none)."""

    def __init__(self, desc: str, unit: str = "it", unit_scale: bool = False) -> None:
        self.desc, self.unit, self.unit_scale = desc, unit, unit_scale
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, desc=self.desc, unit=self.unit, unit_scale=self.unit_scale, dynamic_ncols=True
            )
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@dataclass
class RecordingReporter(Reporter):
    """Keeps everything it is told: the tab polls it, the tests read it."""

    total_steps: int = 0
    total_epochs: int = 0
    steps: list[StepInfo] = field(default_factory=list)
    saved_files: list[Path] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    tasks: list[tuple[str, int, int, str]] = field(default_factory=list)  # the last report of each task
    validations: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    finished: bool = False

    def start(self, total_steps: int, total_epochs: int) -> None:
        self.total_steps, self.total_epochs = total_steps, total_epochs

    def task(self, what: str, done: int, total: int, unit: str = "") -> None:
        report = (what, done, total, unit)
        if self.tasks and self.tasks[-1][0] == what:
            self.tasks[-1] = report
        else:
            self.tasks.append(report)

    def step(self, info: StepInfo) -> None:
        self.steps.append(info)

    def saved(self, path: Path, epoch: int) -> None:
        self.saved_files.append(path)

    def message(self, text: str) -> None:
        self.messages.append(text)

    def validation(self, step: int, loss: float) -> None:
        self.validations.append((step, loss))

    def finish(self) -> None:
        self.finished = True


class MultiReporter(Reporter):
    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def start(self, total_steps: int, total_epochs: int) -> None:
        for r in self.reporters:
            r.start(total_steps, total_epochs)

    def step(self, info: StepInfo) -> None:
        for r in self.reporters:
            r.step(info)

    def saved(self, path: Path, epoch: int) -> None:
        for r in self.reporters:
            r.saved(path, epoch)

    def message(self, text: str) -> None:
        for r in self.reporters:
            r.message(text)

    def validation(self, step: int, loss: float) -> None:
        for r in self.reporters:
            r.validation(step, loss)

    def task(self, what: str, done: int, total: int, unit: str = "") -> None:
        for r in self.reporters:
            r.task(what, done, total, unit)

    def finish(self) -> None:
        for r in self.reporters:
            r.finish()
