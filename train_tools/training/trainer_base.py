"""What the parts of the ``Trainer`` share: the attributes a trainer holds (given to ``__init__`` or made by
``prepare``) and the methods one part calls on another. Declarations only; the code is in ``trainer.py`` (the
run and its loop), ``trainer_setup.py`` (``prepare``), ``trainer_step.py`` (one step), ``trainer_saving.py``
(the run folder and its LoRA files) and ``trainer_resume.py`` (the training state).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import TrainConfig
from ..data.items import DatasetItem
from ..models.text_encoding import Conditioning
from ..progress import Reporter, StopFlag
from ..store import Version
from .resume import ResumePoint

if TYPE_CHECKING:
    from ..models.loader import LoadedModel
    from .run_log import RunLog


class TrainerBase:
    """The state of one training run, declared for every part of the trainer (nothing is set here)."""

    # Given to ``__init__``.
    host: Any  # the program hosting the run (captioners, models folder); None = standalone defaults
    resume: ResumePoint | None  # where a resumed run goes on from; None for a new run
    version: Version
    config: TrainConfig
    checkpoint: Path
    reporter: Reporter
    stop: StopFlag
    requested_device: str | None
    run_name: str | None
    output_name: str
    flat_layout: bool  # lay the LoRA weights out flat where the optimizer allows it (flat_params.py)
    exact_precision: bool  # on a CPU, train in exactly the asked precision even where it is emulated
    prepared: bool
    holds_version: bool  # True inside ``run``: no other run uses the version's folders meanwhile

    # Made by ``prepare``: the device and precision.
    started_at: float
    accelerator: Any
    device: torch.device
    mixed_precision_used: str  # what the run trains in ("no" = fp32), which the file's metadata records
    weight_dtype: torch.dtype
    # The pictures: training pictures, then class pictures (their indices follow the training pictures').
    items: list[DatasetItem]
    reg_items: list[DatasetItem]
    val_items: list[DatasetItem]  # held out of training (validation_split)
    dataset_items: list[DatasetItem]  # the training pictures before the split (the run's snapshot lists them)
    all_items: list[DatasetItem]
    repeats: int
    # The model with its LoRA.
    model: LoadedModel
    train_te: bool
    tes: list[torch.nn.Module]
    tokenizers: list[Any]
    te: torch.nn.Module
    tokenizer: Any
    needs_time_ids: bool
    use_clip_skip: bool
    trainable: list[torch.nn.Parameter]
    lr_shown_factor: float  # the UNet's learning rate over the first group's (block weights, LoRA+)
    run_log: RunLog  # the run's TensorBoard log, from the run folder's opening on
    start_tensors: dict[str, torch.Tensor] | None  # the LoRA file to train on from, until it is loaded
    # The caches.
    mask_cache: list[list[torch.Tensor | None]]  # the loss masks per item and variant (masked_loss), else empty
    latent_cache: list[list[tuple[torch.Tensor, torch.Tensor]]]
    latent_encodes: int
    scaling_factor: float
    cached_text: list[Conditioning] | None
    # The batches and the optimizer.
    sampler: Any
    batches_per_epoch: int
    total_steps: int
    flat: bool
    optimized: list[Any]  # what the optimizer steps: the LoRA weights, or one flat tensor per group
    optimizer: Any
    lr_scheduler: Any
    noise_scheduler: Any
    # Made by the run.
    base_sha256: str | None

    if TYPE_CHECKING:  # what one part calls on another

        def encode_text(self, captions: list[str]) -> Conditioning: ...

        def _local_batch_count(self, epoch: int) -> int: ...

        def _resumed_items(
            self, items: list[DatasetItem], reg_items: list[DatasetItem]
        ) -> tuple[list[DatasetItem], list[DatasetItem]]: ...
