"""Resuming a training run after an Interrupt, a crash, a closed browser, a killed process or a reboot.

Every time the trainer saves a LoRA file it also saves the whole training state beside it, and it saves one
more when it is interrupted::

    trains/<run>/state/step-00000120-save.state        with each saved LoRA file (the epoch saves)
    trains/<run>/state/step-00000133-interrupt.state   when the run was interrupted (Interrupt button, Ctrl-C)
    trains/<run>/state/step-00000200-final.state       with the last LoRA file: the run is finished

A state holds the LoRA weights, the optimizer and learning-rate schedule, every random-number generator the
run draws from (the trainer's own ``random.Random`` and ``torch.Generator``, and Python's, torch's, CUDA's
and numpy's global ones, per process), where the run stood (the epoch, and how many batches of it were done:
the batch order depends only on (seed, epoch), so skipping that many batches puts the data where it was),
the settings, the base model's sha256 and the picture list. Resuming from it continues the run in its own
folder and ends with the same LoRA as a run that was never stopped (equal within float tolerance on the CPU;
GPU kernels need not be bit-for-bit repeatable).

Only two states are kept: the newest, and the newest one written with a LoRA save (so an interrupt state
never pushes out the last epoch's). A kill while a state is being written leaves the previous ones intact,
because every file goes through ``fileio``'s write-to-a-temporary-name-then-rename.

The file is ``torch.save`` of plain tensors, numbers, strings, lists and dicts only, and is read back with
``torch.load(weights_only=True)``: a state file, like any file a person might be handed, can never run code.
A damaged or hand-edited one is checked before anything resumes: the type of every field when it is read
(``load_state``; a newest state that fails this gives way to the one before it), whether it holds together when
the run is opened (``consistency_problem``), and whether it fits the run, its batches, LoRA, optimizer, schedule
and generators, before the trainer restores it (``fit_problem``). What fails is one sentence, never a traceback
and never a run that "finishes" having skipped its work.

This module finds the run to resume and reads what resuming it starts from (``resume_point``); the state itself
is ``state.py``'s, its files ``state_files.py``'s, its checks ``state_checks.py``'s, and the trainer's side
(capturing and restoring it) ``trainer_resume.py``'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import fileio
from ..config import TrainConfig
from ..errors import UserError
from .state import FINAL, TrainState
from .state_checks import consistency_problem, damaged, is_final_file, is_number
from .state_files import latest_state, state_dir, state_files

log = logging.getLogger(__name__)

# Keys the trainer adds to the run's settings.json snapshot beside the TrainConfig fields.
_SNAPSHOT_EXTRAS = ("base_model_path", "repeats_used", "started_at")


def _read_snapshot(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``settings.json`` as written when it began (None if absent); a UserError if damaged."""
    path = Path(run_dir) / "settings.json"
    if not path.is_file():
        return None
    try:
        data = fileio.read_json(path, "start a new run", what=f"The settings of run {Path(run_dir).name},")
    except FileNotFoundError:
        return None
    if not isinstance(data, dict):
        raise UserError(
            f"The settings of run {Path(run_dir).name}, {path}, are not a table of settings; start a new run."
        )
    return data


def read_run_settings(run_dir: Path) -> tuple[TrainConfig, str | None] | None:
    """The run's own settings snapshot (written when it began) and its base model path; None if absent."""
    data = _read_snapshot(run_dir)
    if data is None:
        return None
    base = data.get("base_model_path")
    config = TrainConfig.from_dict({k: v for k, v in data.items() if k not in _SNAPSHOT_EXTRAS})
    return config, (str(base) if base else None)


def run_started_at(run_dir: Path) -> float | None:
    """When the run began (its LoRA files' ``ss_training_started_at``): the time its snapshot records, else
    (a run from before that was recorded) when the snapshot was written; None without a snapshot."""
    data = _read_snapshot(run_dir)
    if data is None:
        return None
    value = data.get("started_at")
    if is_number(value) and value >= 0:
        return float(value)
    return (Path(run_dir) / "settings.json").stat().st_mtime


@dataclass
class ResumePoint:
    """What resuming ``run_dir`` starts from: its state (None: the run saved none yet) and its settings."""

    run_dir: Path
    state: TrainState | None
    config: TrainConfig
    base_model_path: str | None
    started_at: float | None = None  # when the run began; None: it never wrote its snapshot

    @property
    def finished(self) -> bool:
        return self.state is not None and self.state.finished


def resume_point(run_dir: Path, fallback: TrainConfig | None = None) -> ResumePoint:
    """Read what resuming ``run_dir`` needs. The run's own settings win over ``fallback`` (the version's
    current ones), so edits made since the run began cannot change the LoRA it ends with.

    The state is checked for consistency here (its position, its kind, its file names); whether it fits the
    model and the batches of the run is checked by the trainer (``fit_problem``) before it resumes.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"There is no run folder {run_dir}; list the runs with 'python -m train_tools runs'.")
    state = latest_state(run_dir)
    if state is not None:
        try:
            config = state.train_config()
        except UserError as exc:
            raise damaged(run_dir, str(exc).rstrip(".")) from None
        problem = consistency_problem(state, config)
        if problem:
            raise damaged(run_dir, problem)
        return ResumePoint(run_dir, state, config, state.base_model_path or None, state.started_at)
    snapshot = read_run_settings(run_dir)
    if snapshot is not None:
        return ResumePoint(run_dir, None, snapshot[0], snapshot[1], run_started_at(run_dir))
    if fallback is None:
        raise UserError(f"Run {run_dir.name} stopped before it wrote its settings; start a new run.")
    log.warning(
        "Run %s stopped before it wrote its settings; it starts again with the version's settings.", run_dir.name
    )
    return ResumePoint(run_dir, None, fallback, None)


def run_is_finished(run_dir: Path) -> bool:
    """A run is finished when its newest state says so, or (a run without states) its final file exists."""
    files = state_files(run_dir)
    if files:
        return files[0].name.endswith(f"-{FINAL}.state")
    return any(is_final_file(p) for p in Path(run_dir).glob("*.safetensors"))


def _started(run_dir: Path) -> float:
    snapshot = run_dir / "settings.json"
    return (snapshot if snapshot.is_file() else run_dir).stat().st_mtime


def find_run(version: Any, name: str | None = None) -> Path:
    """The run folder to resume: ``name`` (a folder in ``trains/`` or a path to one), or the newest run.

    A name that would lead outside the version's ``trains/`` folder is refused.
    """
    trains = Path(version.trains_dir)
    if name:
        candidate = Path(name).expanduser()
        candidate = candidate if candidate.is_absolute() else trains / candidate
        try:
            resolved = candidate.resolve()
        except (OSError, ValueError) as exc:
            raise UserError(f"'{name}' is not a run of {version.project} / {version.name}.") from exc
        if resolved.parent != trains.resolve() or not resolved.is_dir():
            raise UserError(
                f"'{name}' is not a run of {version.project} / {version.name}; list the runs with "
                f'\'python -m train_tools runs "{version.project}" "{version.name}"\'.'
            )
        return resolved
    runs = version.runs()
    if not runs:
        raise UserError(
            f"{version.project} / {version.name} has no run to resume; start one with Begin Train "
            "or 'python -m train_tools train'."
        )
    return max(runs, key=lambda p: (_started(p), p.name))


def clear_leftovers(run_dir: Path) -> list[Path]:
    """Delete the temporary files a killed run left half-written (only while no run writes there)."""
    return fileio.remove_stale_temp_files(run_dir) + fileio.remove_stale_temp_files(state_dir(run_dir))


def resume_inputs(run_dir: Path, fallback: TrainConfig) -> tuple[TrainConfig, str | None]:
    """The settings and base model path a resume of ``run_dir`` uses, read cheaply from the run's snapshot
    (the state itself is loaded once, by the trainer); ``fallback`` when the run stopped before writing it."""
    snapshot = read_run_settings(run_dir)
    return snapshot if snapshot is not None else (fallback, None)
