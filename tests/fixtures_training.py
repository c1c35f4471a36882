"""Fixtures of the tests that train the tiny demo model many times (resume, regularisation): import them into a
test module's namespace to use them there; and the reporter that presses Interrupt at a given step."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from train_tools.progress import RecordingReporter, StepInfo, StopFlag


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: on a busy 2-core machine several times faster than two threads waiting on each other,
    and the results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from train_tools.models.demo_model import build_demo_checkpoint

    return build_demo_checkpoint(tmp_path_factory.mktemp("models") / "demo.safetensors")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from train_tools.data.demo_dataset import make_demo_dataset

    folder = tmp_path_factory.mktemp("pictures")
    make_demo_dataset(folder, n=2)
    return folder


class StopsAtStep(RecordingReporter):
    """Records like ``RecordingReporter`` and requests ``stop`` once step ``at`` is done, as the Interrupt button
    pressed during that step would."""

    def __init__(self, stop: StopFlag, at: int) -> None:
        super().__init__()
        self.stop, self.at = stop, at

    def step(self, info: StepInfo) -> None:
        super().step(info)
        if info.step == self.at:
            self.stop.request()
