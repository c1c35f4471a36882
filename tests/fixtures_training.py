"""Fixtures of the tests that train the tiny demo model many times (resume, regularisation): import them into a
test module's namespace to use them there."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


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
    from train_tools.demo_model import build_demo_checkpoint

    return build_demo_checkpoint(tmp_path_factory.mktemp("models") / "demo.safetensors")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from train_tools.demo_dataset import make_demo_dataset

    folder = tmp_path_factory.mktemp("pictures")
    make_demo_dataset(folder, n=2)
    return folder
