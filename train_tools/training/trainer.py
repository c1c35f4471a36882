"""The trainer: a version's prepared dataset + a checkpoint -> LoRA files in ``trains/<run>/``.

The whole recipe: prepare the data, load the model, attach LoRA adapters, cache latents (and text-encoder
outputs when the text encoder is frozen), then the usual noise-prediction loop with accelerate handling the
device, mixed precision and data parallelism. This module holds the run (locks, out-of-memory handling, the
result) and its loop over epochs and steps; the ``Trainer`` gets its other parts from mixins, one module each:
``trainer_setup.py`` (``prepare``: device, pictures, model with LoRA, caches, batches, optimizer),
``trainer_step.py`` (one step: latents, text, noise, loss, optimizer step), ``trainer_saving.py`` (the run
folder, LoRA files, samples) and ``trainer_resume.py`` (the training state); ``trainer_base.py`` declares what
they share.
"""

from __future__ import annotations

import gc
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..errors import UserError
from ..names import check_name
from ..progress import Reporter, StepInfo, StopFlag, Stopped
from ..store import Version
from .memory import is_out_of_memory, out_of_memory_advice
from .resume import ResumePoint, resume_point
from .state import FINAL, INTERRUPT, SAVE
from .trainer_resume import ResumeMixin
from .trainer_saving import SavingMixin
from .trainer_setup import SetupMixin
from .trainer_step import StepMixin

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path | None  # None: stopped before the run began (while preparing the pictures)
    files: list[Path]
    steps: int
    epochs_done: int
    interrupted: bool
    losses: list[float] = field(default_factory=list)

    @property
    def final_file(self) -> Path | None:
        return self.files[-1] if self.files else None


class Trainer(SetupMixin, StepMixin, SavingMixin, ResumeMixin):
    """One training run. ``run()`` does everything; the steps are separate methods so tests can look inside."""

    def __init__(
        self,
        version: Version,
        config: TrainConfig,
        checkpoint: Path,
        *,
        reporter: Reporter | None = None,
        stop: StopFlag | None = None,
        device: str | None = None,
        run_name: str | None = None,
        resume_from: Path | None = None,
        host: Any = None,
        lora_dir: Path | None = None,
    ) -> None:
        self.host = host  # the program hosting the run (captioners, models folder); None = standalone defaults
        # Resuming: ``resume_from`` is a run folder (trains/<run>); the run continues there with the settings
        # it began with (its own snapshot wins over ``config``, the version's settings of today).
        self.resume: ResumePoint | None = None
        if resume_from is not None:
            self.resume = resume_point(Path(resume_from), fallback=config)
            if self.resume.config.to_dict() != config.to_dict():
                log.info("Resuming %s with the settings it began with.", self.resume.run_dir.name)
            config = self.resume.config
        # Every name that reaches a file is checked before any work: the output name (also a resumed run's, as
        # its snapshot may have been edited), its length beside the version's folder, and the run's name.
        version.check_settings(config)
        if run_name is not None:
            check_name(run_name, "run name")
        # Training on from a LoRA file (of the LoRA folder): its type and dims are the run's; a resumed run has
        # them in its snapshot, and its state holds the weights.
        self.start_tensors: dict[str, torch.Tensor] | None = None
        if config.network_weights and self.resume is None:
            from ..networks.start_from import read_start, start_file

            path = start_file(config.network_weights, lora_dir or getattr(host, "lora_dir", None))
            self.start_tensors, dims = read_start(path)
            changed = {k: v for k, v in dims.items() if getattr(config, k) != v}
            if changed:
                log.info(
                    "Training on from %s: its network's %s.",
                    path.name,
                    ", ".join(f"{k} {v}" for k, v in changed.items()),
                )
            config = config.updated(dims)
        self.version = version
        self.config = config
        self.checkpoint = Path(checkpoint)
        self.reporter = reporter or Reporter()
        self.stop = stop or StopFlag()
        self.requested_device = device
        self.run_name = run_name
        self.output_name = version.output_name(config)
        # Lay the LoRA weights out flat where the optimizer allows it (flat_params.py); off only to measure or
        # test what the layout changes.
        self.flat_layout = True
        # On a CPU, train in the precision it computes natively when the asked one would be emulated
        # (precision.py); True trains in exactly the asked one where torch can (tests, the benchmark).
        self.exact_precision = False
        self.prepared = False
        self.holds_version = False  # True inside ``run``: no other run uses the version's folders meanwhile

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """Train (or go on training a resumed run) while holding the device and the version.

        Any failure frees the model and the GPU memory first, so the WebUI keeps working; running out of
        memory becomes a UserError naming what to lower or turn on.
        """
        from ..devicelock import hold, hold_version

        label = f"{self.version.project} / {self.version.name}"
        with hold(self.version.data_dir, self.requested_device, label), hold_version(self.version.path, label):
            out_of_memory = False
            self.holds_version = True
            try:
                return self._train()
            except BaseException as exc:
                if not is_out_of_memory(exc):
                    self.release_memory()
                    raise
                log.error("Out of memory: %s", str(exc))  # str: a logged exception would keep its tensors alive
                out_of_memory = True
            finally:
                self.holds_version = False
                run_log = self.__dict__.get("run_log")
                if run_log is not None:  # also after a failure: its writer thread must not write on later
                    run_log.close()
            # Outside the except block: the error and its traceback (which holds the step's tensors) are gone.
            if out_of_memory:
                self.release_memory()
                raise UserError(out_of_memory_advice(self.config))
        raise AssertionError("unreachable")

    def _train(self) -> TrainResult:
        point = self.resume
        if point is not None and point.finished:
            return self._finished_result(point)
        if not self.prepared:
            try:
                self.prepare()
            except Stopped:  # Interrupt while the pictures were being prepared: nothing trained, nothing saved
                self.reporter.message("Stopped while preparing the pictures; nothing was trained.")
                self.reporter.finish()
                return TrainResult(None, [], 0, 0, True)
        cfg, acc = self.config, self.accelerator
        from ..models.loader import file_sha256  # remembered per file: a 7 GB checkpoint is hashed once, not per run

        self.base_sha256 = file_sha256(self.checkpoint) if acc.is_main_process else None
        rng = random.Random(cfg.seed + acc.process_index)
        gen = torch.Generator().manual_seed(cfg.seed + acc.process_index)
        files: list[Path | None] = []  # None: saved by the main process, not this one
        losses: list[float] = []
        step = 0
        start_epoch, start_batch = 1, 0
        state = point.state if point is not None else None
        if point is not None and point.started_at is not None:
            self.started_at = point.started_at  # the run's LoRA files keep the time it began
        if state is not None:  # checked against the run, then restored, before anything in the run changes
            self._restore_state(state, rng, gen)
        run_dir = self._open_run_dir()
        from .run_log import LOGS_FOLDER, RunLog

        self.run_log = RunLog(run_dir / LOGS_FOLDER if cfg.log_with == "tensorboard" and acc.is_main_process else None)
        if state is not None:
            step, start_epoch, start_batch = state.step, state.epoch, state.batch
            files = [run_dir / name for name in state.files if (run_dir / name).is_file()]
            losses = list(state.losses)
            self.reporter.message(
                f"Resuming {run_dir.name} at step {step} of {self.total_steps} (epoch {start_epoch} of {cfg.epochs})."
            )
        self._first_step = step
        self.reporter.start(self.total_steps, cfg.epochs)
        epoch = start_epoch
        done = start_batch
        interrupted = False
        t0 = time.perf_counter()
        unet = self.model.unet
        unet.train()
        if self.train_te:
            self.te.train()
        for epoch in range(start_epoch, cfg.epochs + 1):
            self.sampler.set_epoch(epoch)
            batches = list(self.sampler)
            if acc.num_processes > 1:
                local = self._local_batch_count(epoch)
                batches = batches[: local * acc.num_processes][acc.process_index :: acc.num_processes]
            # The order depends only on (seed, epoch): a resumed run skips the batches it already trained.
            done = start_batch if epoch == start_epoch else 0
            for indices in batches[done:]:
                with acc.accumulate(unet):
                    chosen: list[int] = []
                    latents = self.latents_for(indices, rng, gen, chosen)
                    text = self.text_for(indices, rng, epoch)
                    noise = self.sample_noise(latents, gen)
                    timesteps = self.sample_timesteps(len(indices), gen)
                    perturbed = self.perturbed_noise(noise, gen)
                    weights, mask = self.loss_weights(indices), self.loss_mask(indices, chosen)
                    loss = self.loss(latents, text, noise, timesteps, weights, perturbed, mask)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm:
                        self.clip_gradients(cfg.max_grad_norm)
                    self.optimizer_step()
                    self.lr_scheduler.step()
                    # Flat gradients are zeroed in place: the weights' gradients are views of them.
                    self.optimizer.zero_grad(set_to_none=not self.flat)
                step += 1
                done += 1
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise UserError(
                        "The loss became NaN/inf: lower the learning rate, or use bf16 or fp32 instead of fp16."
                    )
                losses.append(value)
                info = self._step_info(step, epoch, losses, t0)
                self.reporter.step(info)
                self.run_log.step(info)
                if self.stop.requested:
                    interrupted = True
                    break
            if interrupted:
                break
            last = epoch == cfg.epochs
            self.run_log.epoch(epoch, step)
            if self.val_items and (last or epoch % cfg.validate_every_n_epochs == 0):
                held_out = self.validation_loss()
                if held_out is not None:
                    self.reporter.validation(step, held_out)
                    self.run_log.validation(held_out, step)
            if last or epoch % cfg.save_every_n_epochs == 0:
                name = f"{self.output_name}.safetensors" if last else f"{self.output_name}-{epoch:06d}.safetensors"
                files.append(self.save(run_dir / name, epoch, step))
                self._save_state(
                    run_dir,
                    FINAL if last else SAVE,
                    epoch + 1,
                    0,
                    step,
                    finished=last,
                    files=files,
                    losses=losses,
                    rng=rng,
                    gen=gen,
                )
                if files[-1] is not None:
                    self._sample(run_dir, files[-1], epoch, step)
        if interrupted:
            self.reporter.message(f"Interrupted at step {step}; saving what was learned so far.")
            files.append(self.save(run_dir / f"{self.output_name}-{epoch:06d}-interrupted.safetensors", epoch, step))
            self._save_state(
                run_dir, INTERRUPT, epoch, done, step, finished=False, files=files, losses=losses, rng=rng, gen=gen
            )
        result = TrainResult(run_dir, [f for f in files if f is not None], step, epoch, interrupted, losses)
        if not interrupted and cfg.preview_at_end and acc.is_main_process:
            if self.device.type == "cuda":
                self.release_memory()  # the previewer's copy of the model needs the training one's memory
            self._previews_at_end(run_dir)
        self._close_previewer()
        self.run_log.close()
        self.reporter.finish()
        return result

    def _step_info(self, step: int, epoch: int, losses: list[float], t0: float) -> StepInfo:
        elapsed = time.perf_counter() - t0
        # Steps of this session only: a resumed run did the earlier ones at another time.
        speed = (step - getattr(self, "_first_step", 0)) / elapsed if elapsed > 0 else 0.0
        window = losses[-20:]
        return StepInfo(
            step=step,
            total_steps=self.total_steps,
            epoch=epoch,
            total_epochs=self.config.epochs,
            loss=losses[-1],
            avg_loss=sum(window) / len(window),
            lr=float(self.lr_scheduler.get_last_lr()[0]) * self.lr_shown_factor,
            steps_per_s=speed,
            eta_s=(self.total_steps - step) / speed if speed else 0.0,
        )

    # ------------------------------------------------------------------ the end
    def _finished_result(self, point: ResumePoint) -> TrainResult:
        state = point.state
        assert state is not None
        self.reporter.message(f"Run {point.run_dir.name} already finished; there is nothing to resume.")
        files = [point.run_dir / name for name in state.files if (point.run_dir / name).is_file()]
        return TrainResult(point.run_dir, files, state.step, state.epoch - 1, False, list(state.losses))

    def release_memory(self) -> None:
        """Drop the model, optimizer and caches and give their memory back (after a failure, an OOM above
        all): the WebUI's own model needs that memory, and the job keeps this trainer in its error."""
        acc = self.__dict__.get("accelerator")
        if acc is not None and hasattr(acc, "free_memory"):
            acc.free_memory()
        for name in (
            "model",
            "optimizer",
            "lr_scheduler",
            "latent_cache",
            "cached_text",
            "tes",
            "te",
            "trainable",
            "optimized",
            "noise_scheduler",
            "unet",
        ):
            if name in self.__dict__:
                setattr(self, name, None)
        self.prepared = False
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def train(version: Version, config: TrainConfig, checkpoint: Path, **kwargs: Any) -> TrainResult:
    return Trainer(version, config, checkpoint, **kwargs).run()
