"""The trainer's side of resuming (see ``resume.py``): the training state captured with each save and put
back when a run resumes, and a resumed run's pictures and captions as they were when it began.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import torch

from ..data.items import DatasetItem
from ..errors import UserError
from ..fileio import read_json
from .memory import is_out_of_memory
from .trainer_base import TrainerBase
from .trainer_saving import REG_CAPTIONS

REG_PREFIX = "reg/"  # class pictures in a training state's picture list


class ResumeMixin(TrainerBase):
    """The run's pictures as its state lists them, and saving and restoring the training state."""

    def _item_names(
        self, items: list[DatasetItem] | None = None, reg_items: list[DatasetItem] | None = None
    ) -> list[str]:
        """The pictures of the run as its state lists them: the training pictures, then the class pictures
        prefixed with ``reg/`` (a run without class pictures lists what it always did)."""
        items = self.dataset_items if items is None else items  # the held-out pictures too
        reg_items = self.reg_items if reg_items is None else reg_items
        return [item.image.name for item in items] + [f"{REG_PREFIX}{item.image.name}" for item in reg_items]

    def _resumed_items(
        self, items: list[DatasetItem], reg_items: list[DatasetItem]
    ) -> tuple[list[DatasetItem], list[DatasetItem]]:
        """A resumed run trains on the pictures (and class pictures) it began with and their captions of then
        (its snapshot)."""
        point = self.resume
        if point is None:
            return items, reg_items
        names = self._item_names(items, reg_items)
        if point.state is not None and point.state.items and names != point.state.items:
            raise UserError(
                f"The pictures of {self.version.project} / {self.version.name} changed since run "
                f"{point.run_dir.name} began ({len(point.state.items)} then, {len(names)} now), so it "
                "cannot go on as it was; start a new run."
            )
        return (
            self._snapshot_captions(items, point.run_dir / "captions.json"),
            self._snapshot_captions(reg_items, point.run_dir / REG_CAPTIONS),
        )

    @staticmethod
    def _snapshot_captions(items: list[DatasetItem], snapshot: Path) -> list[DatasetItem]:
        if not items or not snapshot.is_file():
            return items
        captions = read_json(snapshot, "start a new run", what=f"The captions of run {snapshot.parent.name},")
        if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
            raise UserError(
                f"The captions of run {snapshot.parent.name}, {snapshot}, are not a table of captions; start a new run."
            )
        return [dataclasses.replace(item, caption=str(captions.get(item.image.name, item.caption))) for item in items]

    def _lora_modules(self) -> dict[str, torch.nn.Module]:
        acc = self.accelerator
        modules = {"unet": acc.unwrap_model(self.model.unet)}
        if self.train_te:
            modules.update({f"te{i}": acc.unwrap_model(te) for i, te in enumerate(self.tes)})
        return modules

    def _lora_weights(self) -> dict[str, torch.nn.Parameter]:
        from ..networks.types import WEIGHT_MARKERS

        return {
            f"{prefix}.{name}": param
            for prefix, module in self._lora_modules().items()
            for name, param in module.named_parameters()
            if any(marker in name for marker in WEIGHT_MARKERS)
        }

    def _save_state(
        self,
        run_dir: Path,
        kind: str,
        epoch: int,
        batch: int,
        step: int,
        *,
        finished: bool,
        files: list[Path | None],
        losses: list[float],
        rng: random.Random,
        gen: torch.Generator,
    ) -> None:
        """Save everything a resume needs (see ``resume.py``); every process sends its generators."""
        from .state import TrainState, capture_rng
        from .state_files import save_state

        acc = self.accelerator
        rngs = [capture_rng(rng, gen)]
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            rngs = gather_object(rngs)
        if not acc.is_main_process:
            return
        scaler = getattr(acc, "scaler", None)
        state = TrainState(
            epoch=epoch,
            batch=batch,
            step=step,
            kind=kind,
            finished=finished,
            config=self.config.to_dict(),
            base_model_path=str(self.checkpoint),
            base_sha256=self.base_sha256,
            started_at=self.started_at,
            files=[f.name for f in files if f is not None],
            losses=list(losses),
            items=self._item_names(),
            lora={name: p.detach().to("cpu", copy=True) for name, p in self._lora_weights().items()},
            optimizer=self.optimizer.state_dict(),
            scheduler=self.lr_scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else None,
            rng=rngs,
        )
        save_state(run_dir, state)

    def _restore_state(self, state: Any, rng: random.Random, gen: torch.Generator) -> None:
        """Put the weights, optimizer, schedule and generators back where the state left them."""
        from .state import capture_rng, restore_rng
        from .state_checks import damaged, fit_problem

        acc = self.accelerator
        run = self.resume.run_dir.name if self.resume is not None else "the run"
        if self.base_sha256 and state.base_sha256 and self.base_sha256 != state.base_sha256:
            began = Path(state.base_model_path).name
            if began == self.checkpoint.name:
                raise UserError(
                    f"{self.checkpoint.name} is not the base model run {run} began with: the file "
                    "has the same name, but its content changed since (its sha256 differs); put the "
                    "original file back to resume the run, or start a new run."
                )
            raise UserError(
                f"{self.checkpoint.name} is not the base model run {run} began with "
                f"({began}); choose that checkpoint to resume it."
            )
        if len(state.rng) != acc.num_processes:
            raise UserError(
                f"Run {run} was trained by {len(state.rng)} processes; resume it with as many GPUs "
                f"(this is {acc.num_processes})."
            )
        weights = self._lora_weights()
        if weights.keys() != state.lora.keys():
            raise UserError(
                f"The training state of run {run} does not fit this model and these settings; start a new run."
            )
        layout = _optimizer_layout(state.optimizer)
        if layout is not None and layout != _optimizer_layout(self.optimizer.state_dict()):
            # another layout of the optimizer's weights (e.g. from before flat_params.py)
            raise UserError(
                f"The optimizer state of run {run} does not fit this version of Train Tools; start a new run."
            )
        scaler = getattr(acc, "scaler", None)
        batch_counts = [self._local_batch_count(epoch) for epoch in range(1, self.config.epochs + 1)]
        problem = fit_problem(
            state,
            batch_counts=batch_counts,
            weights=weights,
            optimizer=self.optimizer,
            scheduler=self.lr_scheduler,
            scaler=scaler,
            rng_now=capture_rng(rng, gen),
            ticks=acc.num_processes,
        )
        if problem:
            raise damaged(Path(run), problem)
        try:  # the checks above leave nothing for these to refuse; should one still, it is the state's damage
            with torch.no_grad():
                for name, param in weights.items():
                    param.copy_(state.lora[name].to(param.device, param.dtype))
            self.optimizer.load_state_dict(state.optimizer)
            self.lr_scheduler.load_state_dict(state.scheduler)
            if scaler is not None and state.scaler:
                scaler.load_state_dict(state.scaler)
            restore_rng(state.rng[acc.process_index], rng, gen)
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, RuntimeError) as exc:
            if is_out_of_memory(exc):
                raise
            raise damaged(Path(run), f"{type(exc).__name__} while restoring it") from exc
        self.started_at = state.started_at


def _optimizer_layout(state: Any) -> list[int] | None:
    """How many weights each group of an optimizer's state holds; None when it is no optimizer state at all."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
    ):
        return None
    return [len(group["params"]) for group in groups]
