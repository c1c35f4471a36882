"""What a run writes for TensorBoard (setting ``log_with``): ``tensorboard --logdir <run>/logs`` shows it.

Per step the loss (``loss/step``, and ``loss/average`` over the last 20 steps as the tab shows it) and the
learning rate (``lr``); per epoch the mean loss (``loss/epoch``) and, with a validation split, the loss on the
held-out pictures (``loss/validation``); the sample pictures of ``sample_every_n_epochs`` (``samples``).

Written with tensorboardX (MIT, numpy + protobuf >= 3.20 only): the ``tensorboard`` package's own writer
(``torch.utils.tensorboard``) needs protobuf 6 since 2.20, which A1111 1.10 (protobuf 3.20) cannot take
without changing a pinned package. Without tensorboardX installed the run trains the same and says so once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..progress import StepInfo

log = logging.getLogger(__name__)

LOGS_FOLDER = "logs"


class RunLog:
    """The run's TensorBoard event file in ``folder`` (None: nothing is written, e.g. on the other processes
    of a multi-GPU run)."""

    def __init__(self, folder: Path | None) -> None:
        self.writer: Any = None
        self.epoch_losses: list[float] = []
        if folder is None:
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            log.info("tensorboardX is not installed: no TensorBoard logs (pip install tensorboardX to get them).")
            return
        self.writer = SummaryWriter(str(folder), flush_secs=30)

    def step(self, info: StepInfo) -> None:
        self.epoch_losses.append(info.loss)
        if self.writer is not None:
            self.writer.add_scalar("loss/step", info.loss, info.step)
            self.writer.add_scalar("loss/average", info.avg_loss, info.step)
            self.writer.add_scalar("lr", info.lr, info.step)

    def epoch(self, epoch: int, step: int) -> None:
        if self.writer is not None and self.epoch_losses:
            self.writer.add_scalar("loss/epoch", sum(self.epoch_losses) / len(self.epoch_losses), step)
            self.writer.add_scalar("epoch", epoch, step)
        self.epoch_losses = []

    def validation(self, loss: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar("loss/validation", loss, step)

    def pictures(self, paths: list[Path], step: int) -> None:
        if self.writer is None:
            return
        import numpy as np
        from PIL import Image

        for i, path in enumerate(paths):
            with Image.open(path) as picture:
                self.writer.add_image(f"samples/{i}", np.asarray(picture.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


__all__ = ["LOGS_FOLDER", "RunLog"]
