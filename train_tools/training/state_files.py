"""Training state files: ``trains/<run>/state/step-<step>-<kind>.state``, written atomically, pruned to the
newest and the newest LoRA save, and read back without running any code.

The file is ``torch.save`` of plain tensors, numbers, strings, lists and dicts only, and is read back with
``torch.load(weights_only=True)``; every field's type is checked as it is read (``state_checks.type_problem``),
and a newest state that fails this gives way to the one before it (``latest_state``).
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from .. import fileio
from ..errors import UserError
from .state import FORMAT, INTERRUPT, KIND_ORDER, TrainState
from .state_checks import type_problem

log = logging.getLogger(__name__)

STATE_DIR = "state"
_STATE_NAME = re.compile(r"^step-(\d{8,})-(save|interrupt|final)\.state$")
_MAX_DEPTH = 16  # a state nests 4 levels (optimizer, state, weight, tensor); deeper is damage or mischief


def state_dir(run_dir: Path) -> Path:
    return Path(run_dir) / STATE_DIR


def state_file_name(step: int, kind: str) -> str:
    if kind not in KIND_ORDER:
        raise ValueError(f"Unknown state kind {kind!r}.")
    return f"step-{step:08d}-{kind}.state"


def state_files(run_dir: Path) -> list[Path]:
    """The run's state files, newest first (at one step a save state is newer than an interrupt state)."""
    folder = state_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _STATE_NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), KIND_ORDER[match.group(2)], path))
    return [path for *_key, path in sorted(found, reverse=True)]


def save_state(run_dir: Path, state: TrainState) -> Path:
    """Write ``state`` atomically into ``<run>/state/``, then drop all but the newest and the newest save."""
    target = state_dir(run_dir) / state_file_name(state.step, state.kind)
    obj = asdict(state)

    def write(tmp: Path) -> None:
        # Through a Python file object so that a full disk raises OSError (ENOSPC), which fileio reports.
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)

    fileio.write_with(target, write)
    prune_states(run_dir, keep=target)
    return target


def prune_states(run_dir: Path, keep: Path | None = None) -> None:
    files = state_files(run_dir)
    keep_set = {keep} if keep is not None else set(files[:1])
    newest_save = next((p for p in files if not p.name.endswith(f"-{INTERRUPT}.state")), None)
    if newest_save is not None:
        keep_set.add(newest_save)
    for path in files:
        if path not in keep_set:
            path.unlink(missing_ok=True)


def load_state(path: Path) -> TrainState:
    """Read a state file without running any code in it; a UserError if it is damaged or not a state.

    Every field is checked for its type here (a hand-edited or damaged file stops with a sentence, not a
    traceback deep in the trainer); whether the state is consistent, and fits the run, is checked by
    ``resume_point`` and ``fit_problem``.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # not plain data (torch's own text advises unsafe loading: not shown)
        raise UserError(
            f"The training state {path.name} is damaged (it holds more than plain tensors, numbers "
            "and text, and is not read); resume from an older state or start a new run."
        ) from exc
    except (OSError, RuntimeError, ValueError, EOFError) as exc:  # damage: RuntimeError
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise UserError(
            f"The training state {path.name} is damaged ({reason}); resume from an older state or start a new run."
        ) from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise UserError(f"{path.name} is not a Train Tools training state (format {FORMAT}); start a new run.")
    names = {f.name for f in fields(TrainState)}
    missing = names - obj.keys()
    if missing:
        raise UserError(f"The training state {path.name} lacks {', '.join(sorted(missing))}; start a new run.")
    if fileio.nesting_depth(obj) > _MAX_DEPTH:
        problem: str | None = f"it is nested more than {_MAX_DEPTH} levels deep"
    else:
        problem = type_problem(obj) or _name_problem(path, obj)
    if problem:
        raise UserError(
            f"The training state {path.name} is damaged ({problem}); resume from an older state or start a new run."
        )
    return TrainState(**{k: v for k, v in obj.items() if k in names})


def _name_problem(path: Path, obj: dict[str, Any]) -> str | None:
    """A state file is named by its step and kind: a file whose content says otherwise was renamed or edited."""
    match = _STATE_NAME.match(path.name)
    if match and (int(match.group(1)), match.group(2)) != (obj["step"], obj["kind"]):
        return f"it says step {obj['step']} ({obj['kind']}) but is named for step {int(match.group(1))}"
    return None


def latest_state(run_dir: Path) -> TrainState | None:
    """The newest state of the run that loads; None when the run saved none."""
    errors = []
    for path in state_files(run_dir):
        try:
            return load_state(path)
        except UserError as exc:
            log.warning("%s", exc)
            errors.append(str(exc))
    if errors:
        raise UserError(f"No training state of {Path(run_dir).name} can be read ({errors[0]}); start a new run.")
    return None
