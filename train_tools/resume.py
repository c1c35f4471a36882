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
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from . import fileio
from .config import TrainConfig
from .errors import UserError

log = logging.getLogger(__name__)

FORMAT = 1
STATE_DIR = "state"
SAVE, INTERRUPT, FINAL = "save", "interrupt", "final"
_KIND_ORDER = {INTERRUPT: 0, SAVE: 1, FINAL: 2}  # at one step, the later kind is the newer state
_STATE_NAME = re.compile(r"^step-(\d{8,})-(save|interrupt|final)\.state$")
# Keys the trainer adds to the run's settings.json snapshot beside the TrainConfig fields.
_SNAPSHOT_EXTRAS = ("base_model_path", "repeats_used")


@dataclass
class TrainState:
    """Where a run stood, and everything needed to go on from there exactly as if it had not stopped."""

    epoch: int  # the epoch to continue in, 1-based (epochs + 1 once the run is finished)
    batch: int  # batches of that epoch already trained
    step: int  # steps trained in all
    kind: str  # SAVE, INTERRUPT, or FINAL (the save at the end of the run)
    finished: bool
    config: dict[str, Any]
    base_model_path: str
    base_sha256: str | None
    started_at: float
    files: list[str] = field(default_factory=list)  # names of the LoRA files saved so far, in order
    losses: list[float] = field(default_factory=list)
    items: list[str] = field(default_factory=list)  # the prepared pictures trained on, in order
    lora: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    scaler: dict[str, Any] | None = None
    rng: list[dict[str, Any]] = field(default_factory=list)  # one entry per training process
    format: int = FORMAT

    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict(dict(self.config))


# ---------------------------------------------------------------------- random-number generators

def capture_rng(rng: random.Random, gen: torch.Generator) -> dict[str, Any]:
    """Every generator a training step may draw from, as plain values."""
    out: dict[str, Any] = {
        "trainer_python": _python_state(rng.getstate()),
        "trainer_torch": gen.get_state(),
        "python": _python_state(random.getstate()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        out["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached": float(cached)}
    except ImportError:
        pass
    return out


def restore_rng(saved: dict[str, Any], rng: random.Random, gen: torch.Generator) -> None:
    rng.setstate(_python_tuple(saved["trainer_python"]))
    gen.set_state(saved["trainer_torch"])
    random.setstate(_python_tuple(saved["python"]))
    torch.set_rng_state(saved["torch"])
    cuda = saved.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    numpy_state = saved.get("numpy")
    if numpy_state:
        import numpy as np

        np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype("uint32"),
                             numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached"]))


def _python_state(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_tuple(saved: dict[str, Any]) -> tuple:
    return saved["version"], tuple(int(v) for v in saved["internal"].tolist()), saved["gauss"]


# ---------------------------------------------------------------------- state files

def state_dir(run_dir: Path) -> Path:
    return Path(run_dir) / STATE_DIR


def state_file_name(step: int, kind: str) -> str:
    if kind not in _KIND_ORDER:
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
            found.append((int(match.group(1)), _KIND_ORDER[match.group(2)], path))
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
    """Read a state file without running any code in it; a UserError if it is damaged or not a state."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:  # damage: RuntimeError
        raise UserError(f"The training state {path.name} is damaged ({exc}); resume from an older state or "
                        "start a new run.") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise UserError(f"{path.name} is not a Train Tools training state (format {FORMAT}); start a new run.")
    names = {f.name for f in fields(TrainState)}
    missing = names - obj.keys()
    if missing:
        raise UserError(f"The training state {path.name} lacks {', '.join(sorted(missing))}; start a new run.")
    return TrainState(**{k: v for k, v in obj.items() if k in names})


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


# ---------------------------------------------------------------------- runs

def read_run_settings(run_dir: Path) -> tuple[TrainConfig, str | None] | None:
    """The run's own settings snapshot (written when it began) and its base model path; None if absent."""
    path = Path(run_dir) / "settings.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"The settings of run {Path(run_dir).name} are damaged ({exc}); start a new run.") from exc
    base = data.get("base_model_path")
    config = TrainConfig.from_dict({k: v for k, v in data.items() if k not in _SNAPSHOT_EXTRAS})
    return config, (str(base) if base else None)


@dataclass
class ResumePoint:
    """What resuming ``run_dir`` starts from: its state (None: the run saved none yet) and its settings."""

    run_dir: Path
    state: TrainState | None
    config: TrainConfig
    base_model_path: str | None

    @property
    def finished(self) -> bool:
        return self.state is not None and self.state.finished


def resume_point(run_dir: Path, fallback: TrainConfig | None = None) -> ResumePoint:
    """Read what resuming ``run_dir`` needs. The run's own settings win over ``fallback`` (the version's
    current ones), so edits made since the run began cannot change the LoRA it ends with."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"There is no run folder {run_dir}; list the runs with 'python -m train_tools runs'.")
    state = latest_state(run_dir)
    if state is not None:
        return ResumePoint(run_dir, state, state.train_config(), state.base_model_path or None)
    snapshot = read_run_settings(run_dir)
    if snapshot is not None:
        return ResumePoint(run_dir, None, snapshot[0], snapshot[1])
    if fallback is None:
        raise UserError(f"Run {run_dir.name} stopped before it wrote its settings; start a new run.")
    log.warning("Run %s stopped before it wrote its settings; it starts again with the version's settings.",
                run_dir.name)
    return ResumePoint(run_dir, None, fallback, None)


def run_is_finished(run_dir: Path) -> bool:
    """A run is finished when its newest state says so, or (a run without states) its final file exists."""
    files = state_files(run_dir)
    if files:
        return files[0].name.endswith(f"-{FINAL}.state")
    return any(_is_final_file(p) for p in Path(run_dir).glob("*.safetensors"))


def _is_final_file(path: Path) -> bool:
    """``<name>.safetensors`` rather than an epoch's ``<name>-000003`` or ``<name>-000003-interrupted``."""
    tail = path.stem.rsplit("-", 1)[-1]
    return not (len(tail) == 6 and tail.isdigit()) and tail != "interrupted"


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
            raise UserError(f"'{name}' is not a run of {version.project} / {version.name}; list the runs with "
                            f"'python -m train_tools runs \"{version.project}\" \"{version.name}\"'.")
        return resolved
    runs = version.runs()
    if not runs:
        raise UserError(f"{version.project} / {version.name} has no run to resume; start one with Begin Train "
                        "or 'python -m train_tools train'.")
    return max(runs, key=lambda p: (_started(p), p.name))


def clear_leftovers(run_dir: Path) -> list[Path]:
    """Delete the temporary files a killed run left half-written (only while no run writes there)."""
    return fileio.remove_stale_temp_files(run_dir) + fileio.remove_stale_temp_files(state_dir(run_dir))


def resume_inputs(run_dir: Path, fallback: TrainConfig) -> tuple[TrainConfig, str | None]:
    """The settings and base model path a resume of ``run_dir`` uses, read cheaply from the run's snapshot
    (the state itself is loaded once, by the trainer); ``fallback`` when the run stopped before writing it."""
    snapshot = read_run_settings(run_dir)
    return snapshot if snapshot is not None else (fallback, None)
