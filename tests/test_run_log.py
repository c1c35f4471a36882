"""Watching a run (issue 18, item 7): the loss, learning rate and samples as TensorBoard event files under the
run, read back with TensorBoard's own reader; a validation split whose loss, at fixed noise and timesteps, is
reported per epoch and drawn in the tab's chart beside the training loss."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import fixtures_training
from tests.test_precision import new_version
from train_tools.config import TrainConfig
from train_tools.progress import RecordingReporter, StepInfo
from train_tools.training.run_log import LOGS_FOLDER
from train_tools.training.trainer import Trainer
from train_tools.training.trainer_setup import split_validation
from train_tools.ui.html import loss_chart_svg

demo_ckpt = fixtures_training.demo_ckpt
one_thread = fixtures_training.one_thread


@pytest.fixture(scope="module")
def four_pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from train_tools.data.demo_dataset import make_demo_dataset

    folder = tmp_path_factory.mktemp("pictures")
    make_demo_dataset(folder, n=4)
    return folder


def settings(**changes: object) -> TrainConfig:
    base = dict(resolution=64, network_dim=4, network_alpha=4.0, epochs=2, repeats=1, batch_size=1)
    base.update(optimizer="AdamW", learning_rate=1e-3, preview_at_end=False, max_token_length=75, save_every_n_epochs=1)
    return TrainConfig().updated({**base, **changes})


def test_a_run_writes_what_tensorboard_reads(
    tmp_path: Path, demo_ckpt: Path, four_pictures: Path, one_thread: None
) -> None:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    pytest.importorskip("tensorboardX")
    reporter = RecordingReporter()
    config = settings(validation_split=0.25, sample_every_n_epochs=2)
    trainer = Trainer(new_version(tmp_path, four_pictures), config, demo_ckpt, device="cpu", reporter=reporter)
    result = trainer.run()
    assert result.run_dir is not None and len(trainer.items) == 3 and len(trainer.val_items) == 1
    logs = result.run_dir / LOGS_FOLDER
    events = accumulator.EventAccumulator(str(logs), size_guidance={accumulator.SCALARS: 0, accumulator.IMAGES: 0})
    events.Reload()
    tags = events.Tags()
    scalars = {tag: events.Scalars(tag) for tag in tags["scalars"]}
    assert [e.value for e in scalars["loss/step"]] == pytest.approx(result.losses)
    assert [e.step for e in scalars["loss/step"]] == list(range(1, result.steps + 1))
    assert len(scalars["loss/epoch"]) == 2 and len(scalars["lr"]) == result.steps
    assert scalars["loss/epoch"][0].value == pytest.approx(sum(result.losses[:3]) / 3)
    assert [e.step for e in scalars["loss/validation"]] == [s for s, _ in reporter.validations] == [3, 6]
    assert [e.value for e in scalars["loss/validation"]] == pytest.approx([v for _, v in reporter.validations])
    assert tags["images"] and events.Images(tags["images"][0])[0].step == 6  # the samples of epoch 2


def test_the_validation_pictures_are_held_out_and_measured_the_same_way(
    tmp_path: Path, demo_ckpt: Path, four_pictures: Path, one_thread: None
) -> None:
    config = settings(validation_split=0.5, log_with="none")
    trainer = Trainer(new_version(tmp_path, four_pictures), config, demo_ckpt, device="cpu")
    trainer.prepare()
    held = {item.image for item in trainer.val_items}
    assert len(held) == 2 and not held & {item.image for item in trainer.items}
    trained_indices = {i for epoch in (1, 2) for batch in _batches(trainer, epoch) for i in batch}
    assert trained_indices <= set(range(len(trainer.items)))  # never a held-out picture
    first = trainer.validation_loss()
    assert first is not None and first == trainer.validation_loss()  # fixed noise and timesteps
    result = trainer.run()
    assert result.final_file is not None and trainer.validation_loss() != first  # the network changed it
    assert not (result.run_dir / LOGS_FOLDER).exists()  # log_with none


def _batches(trainer: Trainer, epoch: int) -> list[list[int]]:
    trainer.sampler.set_epoch(epoch)
    return list(trainer.sampler)


def test_the_split_is_fixed_by_the_seed() -> None:
    items = list(range(10))
    trained, held = split_validation(items, 0.2, 7)
    assert len(held) == 2 and sorted(trained + held) == items and split_validation(items, 0.2, 7) == (trained, held)
    assert split_validation(items, 0.0, 7) == (items, []) and split_validation([1], 0.5, 7) == ([1], [])
    assert len(split_validation(items, 0.5, 1)[1]) == 5 and len(split_validation([1, 2], 0.5, 1)[0]) == 1


def test_the_chart_draws_the_validation_loss_beside_the_training_loss() -> None:
    losses = [1.0 - i / 100 for i in range(100)]
    svg = loss_chart_svg(losses, validation=[(49, 0.7), (99, 1.2)])
    assert 'class="tt-validation"' in svg and "validation loss (orange) 1.2000" in svg
    assert "1.2000 (top)" in svg  # the scale takes in the validation points
    assert "tt-validation" not in loss_chart_svg(losses)


class _FailsAtStep(RecordingReporter):
    def step(self, info: StepInfo) -> None:
        super().step(info)
        if info.step == 2:
            raise RuntimeError("the disk is full")


def test_a_failed_run_closes_its_log(tmp_path: Path, demo_ckpt: Path, four_pictures: Path, one_thread: None) -> None:
    """A run that fails still closes its event file: no writer thread goes on writing into the run folder."""
    pytest.importorskip("tensorboardX")
    trainer = Trainer(
        new_version(tmp_path, four_pictures), settings(), demo_ckpt, device="cpu", reporter=_FailsAtStep()
    )
    with pytest.raises(RuntimeError, match="the disk is full"):
        trainer.run()
    assert trainer.run_log.writer is None
    (events,) = (tmp_path / "outputs").rglob("events.out.tfevents.*")
    assert events.stat().st_size > 0  # what it had, flushed at the close
