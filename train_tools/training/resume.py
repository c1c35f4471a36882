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
"""

from __future__ import annotations

import logging
import math
import pickle
import random
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .. import fileio
from ..config import TrainConfig
from ..errors import UserError

log = logging.getLogger(__name__)

FORMAT = 1
STATE_DIR = "state"
SAVE, INTERRUPT, FINAL = "save", "interrupt", "final"
_KIND_ORDER = {INTERRUPT: 0, SAVE: 1, FINAL: 2}  # at one step, the later kind is the newer state
_STATE_NAME = re.compile(r"^step-(\d{8,})-(save|interrupt|final)\.state$")
# Keys the trainer adds to the run's settings.json snapshot beside the TrainConfig fields.
_SNAPSHOT_EXTRAS = ("base_model_path", "repeats_used", "started_at")
_MAX_DEPTH = 16  # a state nests 4 levels (optimizer, state, weight, tensor); deeper is damage or mischief
_HUGE = 1 << 62


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
    """Read a state file without running any code in it; a UserError if it is damaged or not a state.

    Every field is checked for its type here (a hand-edited or damaged file stops with a sentence, not a
    traceback deep in the trainer); whether the state is consistent, and fits the run, is checked by
    ``resume_point`` and ``fit_problem``.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # not plain data (torch's own text advises unsafe loading: not shown)
        raise UserError(f"The training state {path.name} is damaged (it holds more than plain tensors, numbers "
                        "and text, and is not read); resume from an older state or start a new run.") from exc
    except (OSError, RuntimeError, ValueError, EOFError) as exc:  # damage: RuntimeError
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise UserError(f"The training state {path.name} is damaged ({reason}); resume from an older state or "
                        "start a new run.") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise UserError(f"{path.name} is not a Train Tools training state (format {FORMAT}); start a new run.")
    names = {f.name for f in fields(TrainState)}
    missing = names - obj.keys()
    if missing:
        raise UserError(f"The training state {path.name} lacks {', '.join(sorted(missing))}; start a new run.")
    if fileio.nesting_depth(obj) > _MAX_DEPTH:
        problem: str | None = f"it is nested more than {_MAX_DEPTH} levels deep"
    else:
        problem = _type_problem(obj) or _name_problem(path, obj)
    if problem:
        raise UserError(f"The training state {path.name} is damaged ({problem}); resume from an older state or "
                        "start a new run.")
    return TrainState(**{k: v for k, v in obj.items() if k in names})


def _is_int(value: Any) -> bool:
    """A whole number a tensor or a message can hold (a hostile one may have thousands of digits)."""
    return isinstance(value, int) and not isinstance(value, bool) and -_HUGE < value < _HUGE


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool; not an int too large for a float or a tensor)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return _is_int(value)


def _is_plain(value: Any) -> bool:
    """None, a bool, a finite number or a short text: what an optimizer keeps beside its tensors."""
    return value is None or isinstance(value, bool) or _is_number(value) or (isinstance(value, str)
                                                                             and len(value) < 100)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _type_problem(obj: dict[str, Any]) -> str | None:
    """What in a loaded state's fields has the wrong type, or None."""
    for key in ("epoch", "batch", "step", "format"):
        if not _is_int(obj[key]):
            return f"its {key} is {_shown(obj[key])}, not a whole number"
    checks: list[tuple[str, bool, str]] = [
        ("kind", isinstance(obj["kind"], str) and obj["kind"] in _KIND_ORDER, f"one of {', '.join(_KIND_ORDER)}"),
        ("finished", isinstance(obj["finished"], bool), "true or false"),
        ("config", isinstance(obj["config"], dict) and all(isinstance(k, str) for k in obj["config"]),
         "a table of settings"),
        ("base_model_path", isinstance(obj["base_model_path"], str), "a file path"),
        ("base_sha256", obj["base_sha256"] is None or (isinstance(obj["base_sha256"], str)
                                                       and bool(re.fullmatch(r"[0-9a-f]{64}", obj["base_sha256"]))),
         "a sha256"),
        ("started_at", _is_number(obj["started_at"]) and obj["started_at"] >= 0, "a time"),
        ("files", _is_str_list(obj["files"]), "a list of file names"),
        ("losses", isinstance(obj["losses"], list) and all(_is_number(v) for v in obj["losses"]),
         "a list of numbers"),
        ("items", _is_str_list(obj["items"]), "a list of picture names"),
        ("lora", isinstance(obj["lora"], dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj["lora"].items()),
         "a table of tensors"),
        ("optimizer", isinstance(obj["optimizer"], dict), "a table"),
        ("scheduler", isinstance(obj["scheduler"], dict), "a table"),
        ("scaler", obj["scaler"] is None or isinstance(obj["scaler"], dict), "a table"),
        ("rng", isinstance(obj["rng"], list) and all(isinstance(v, dict) for v in obj["rng"]),
         "a list of tables"),
    ]
    for key, ok, expected in checks:
        if not ok:
            return f"its {key} is {_shown(obj[key])}, not {expected}"
    return None


def _name_problem(path: Path, obj: dict[str, Any]) -> str | None:
    """A state file is named by its step and kind: a file whose content says otherwise was renamed or edited."""
    match = _STATE_NAME.match(path.name)
    if match and (int(match.group(1)), match.group(2)) != (obj["step"], obj["kind"]):
        return f"it says step {obj['step']} ({obj['kind']}) but is named for step {int(match.group(1))}"
    return None


def _shown(value: Any, limit: int = 40) -> str:
    """A short view of a value for a message (a hostile value may be huge or nested deep: never its repr)."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (dict, list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    if isinstance(value, int) and not isinstance(value, bool) and not -_HUGE < value < _HUGE:
        return "a huge number"
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit] + "..."
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= limit + 5 else text[:limit] + "..."


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
        raise UserError(f"The settings of run {Path(run_dir).name}, {path}, are not a table of settings; start "
                        "a new run.")
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
    if _is_number(value) and value >= 0:
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
    log.warning("Run %s stopped before it wrote its settings; it starts again with the version's settings.",
                run_dir.name)
    return ResumePoint(run_dir, None, fallback, None)


def damaged(run_dir: Path, problem: str) -> UserError:
    """The error for a state that does not hold together or does not fit its run."""
    return UserError(f"The saved training state of run {Path(run_dir).name} is damaged ({problem}); start a new "
                     "run.")


def consistency_problem(state: TrainState, config: TrainConfig) -> str | None:
    """What in ``state`` (of a run with ``config``) contradicts itself, or None. What needs the run's batches
    and model is ``fit_problem``'s."""
    epochs = config.epochs
    for what, value, least in (("epoch", state.epoch, 1), ("batch", state.batch, 0), ("step", state.step, 0)):
        if value < least:
            return f"its {what} is {value}, below {least}"
    if state.epoch > epochs + 1:
        return f"epoch {state.epoch} is past the end of the run, which has {epochs} epochs"
    ends = state.epoch == epochs + 1
    if state.finished != (state.kind == FINAL) or state.finished != ends:
        return (f"it is a {state.kind} state at epoch {state.epoch} of {epochs}, "
                f"{'finished' if state.finished else 'not finished'}; those do not go together")
    if state.kind != INTERRUPT and state.batch != 0:
        return f"a {state.kind} state is made at the end of an epoch, not after batch {state.batch}"
    if len(state.losses) != state.step:
        return f"it holds {len(state.losses)} losses for {state.step} steps"
    for name in state.files:
        if not _plain_lora_name(name):
            return f"{_shown(name)} is not the name of a LoRA file in the run folder"
    if state.finished and not (state.files and _is_final_file(Path(state.files[-1]))):
        return "it says the run is finished but names no final LoRA file"
    if not state.items:
        return "it lists no pictures"
    if not state.lora:
        return "it holds no LoRA weights"
    if not state.rng:
        return "it holds no random-number generators"
    return None


def _plain_lora_name(name: str) -> bool:
    """A file name inside the run folder: no folder part, no way up or out."""
    return (name.endswith(".safetensors") and not name.startswith(".") and "/" not in name and "\\" not in name
            and "\x00" not in name and ":" not in name and Path(name).name == name)


def fit_problem(state: TrainState, *, batch_counts: list[int], weights: dict[str, torch.Tensor],
                optimizer: Any, scheduler: Any, scaler: Any, rng_now: dict[str, Any], ticks: int = 1
                ) -> str | None:
    """What in ``state`` does not fit the run it resumes, or None: ``batch_counts`` are the batches of each
    epoch (``batch_counts[0]`` of epoch 1), ``weights`` the LoRA weights built for the run (names already
    checked), the optimizer, schedule and gradient scaler those of the run before any step, ``rng_now`` what
    ``capture_rng`` gives now, ``ticks`` the schedule's steps per training step (one per process)."""
    epochs = len(batch_counts)
    if state.epoch <= epochs:
        in_epoch = batch_counts[state.epoch - 1]
        if state.batch > in_epoch:
            return (f"batch {state.batch} is past the end of epoch {state.epoch}, which has {in_epoch} "
                    f"batch{'es' if in_epoch != 1 else ''}")
    expected = sum(batch_counts[: state.epoch - 1]) + state.batch
    if state.step != expected:
        return f"step {state.step} is not where batch {state.batch} of epoch {state.epoch} ends (step {expected})"
    for name, param in weights.items():
        saved = state.lora[name]
        if tuple(saved.shape) != tuple(param.shape) or not saved.is_floating_point():
            return (f"LoRA weight {_shown(name)} is {_shown(saved)} of {saved.dtype}, not of shape "
                    f"{tuple(param.shape)}")
        if not bool(torch.isfinite(saved).all()):
            return f"LoRA weight {_shown(name)} holds NaN or infinite values"
    problem = _optimizer_problem(state.optimizer, optimizer)
    if problem:
        return problem
    live_schedule = scheduler.state_dict()
    problem = structure_problem(state.scheduler, live_schedule, "the learning-rate schedule", partial=True)
    if problem:
        return problem
    last = state.scheduler.get("last_epoch", 0)
    if not 0 <= last <= state.step * ticks:
        return f"the learning-rate schedule stands at step {last}, past step {state.step} of the run"
    if scaler is not None and state.scaler is not None:
        problem = structure_problem(state.scaler, scaler.state_dict(), "the gradient scaler")
        if problem:
            return problem
    for index, saved in enumerate(state.rng):
        problem = _rng_problem(saved, rng_now, f"the random-number generators of process {index}")
        if problem:
            return problem
    return None


# The per-weight optimizer states that are float tensors of the weight's own shape (AdamW, SGD, Lion, Prodigy,
# AdaFactor unfactored; Prodigy's p0 and s may be slices), and those of bitsandbytes' 8-bit optimizers
# (quantized: any dtype).
_WEIGHT_SHAPED = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"})
_WEIGHT_SHAPED_8BIT = frozenset({"state1", "state2"})


def _optimizer_problem(saved: dict[str, Any], optimizer: Any) -> str | None:
    """``saved`` against the run's freshly built optimizer: the same groups of the same weights, the same
    settings per group, and per weight only tensors and numbers (those a weight's shape has that shape)."""
    live = optimizer.state_dict()
    if set(saved) != {"state", "param_groups"}:
        return "the optimizer's state is not one torch writes"
    groups, live_groups = saved["param_groups"], live["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(live_groups):
        return "the optimizer's weight groups are not the run's"
    params: dict[int, torch.Tensor] = {}
    for index, (group, live_group, tensors) in enumerate(zip(groups, live_groups, optimizer.param_groups)):
        if not isinstance(group, dict) or group.get("params") != live_group["params"]:
            return "the optimizer's weight groups are not the run's"
        # The run's own settings of the group as the run has them; some optimizers add more as they step
        # (Prodigy's estimates): those must be plain values.
        settings = {k: v for k, v in group.items() if k in live_group and k != "params"}
        live_settings = {k: v for k, v in live_group.items() if k != "params"}
        problem = structure_problem(settings, live_settings, f"the optimizer's group {index + 1}", partial=True)
        if problem:
            return problem
        for key, value in group.items():
            if key not in live_group and not (_is_plain(value) or isinstance(value, torch.Tensor)):
                return f"the optimizer's group {index + 1}, {_shown(key)} is {_shown(value)}"
        params.update(zip(live_group["params"], tensors["params"]))
    per_weight = saved["state"]
    if not isinstance(per_weight, dict):
        return "the optimizer's state is not one torch writes"
    for key, values in per_weight.items():
        if not _is_int(key) or key not in params or not isinstance(values, dict):
            return "the optimizer's state names weights the run does not have"
        shape = tuple(params[key].shape)
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                wrong = ((name in _WEIGHT_SHAPED and not value.is_floating_point())
                         or (name in _WEIGHT_SHAPED | _WEIGHT_SHAPED_8BIT and tuple(value.shape) != shape)
                         or (name == "step" and value.numel() != 1))
                if wrong:
                    return f"the optimizer's {_shown(name)} of weight {key} is {_shown(value)} of {value.dtype}"
            elif not _is_plain(value):
                return f"the optimizer's {_shown(name)} of weight {key} is {_shown(value)}"
    return None


def _rng_problem(saved: dict[str, Any], now: dict[str, Any], where: str) -> str | None:
    """A saved generator state against the generators of now: the same kinds of the same sizes. GPUs may
    differ in number (``restore_rng`` then leaves theirs), numpy may be missing on either side."""
    skip = {"cuda", "numpy"}
    problem = structure_problem({k: v for k, v in saved.items() if k not in skip},
                                {k: v for k, v in now.items() if k not in skip}, where)
    if problem:
        return problem
    cuda = saved.get("cuda", [])
    if not isinstance(cuda, list) or not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda):
        return f"{where}: the GPU generators are not generator states"
    if "numpy" in saved and "numpy" in now:
        problem = structure_problem(saved["numpy"], now["numpy"], f"{where}: numpy's")
        if problem:
            return problem
        if saved["numpy"]["kind"] != now["numpy"]["kind"]:
            return f"{where}: numpy's is not a {now['numpy']['kind']} state"
    for key in ("trainer_python", "python"):
        internal = saved[key]["internal"]
        words, position = internal[:-1], int(internal[-1])
        if bool(((words < 0) | (words >= 1 << 32)).any()) or not 0 <= position <= len(words):
            return f"{where}: Python's ({key}) is not a Mersenne Twister state"
    return None


def structure_problem(saved: Any, like: Any, where: str, *, partial: bool = False) -> str | None:
    """Whether ``saved`` has the structure of ``like`` (what the run's own object gives now): the same keys
    (with ``partial``, at the top a subset), lists of the same length, tensors of the same dtype and shape,
    numbers for numbers. Recurses only as deep as ``like``, which this program made."""
    if isinstance(like, torch.Tensor):
        if not isinstance(saved, torch.Tensor) or saved.dtype != like.dtype or saved.shape != like.shape:
            return f"{where} is {_shown(saved)}, not a {like.dtype} tensor of shape {tuple(like.shape)}"
        return None
    if isinstance(like, dict):
        if not isinstance(saved, dict):
            return f"{where} is {_shown(saved)}, not a table"
        extra = [k for k in saved if k not in like]
        missing = [k for k in like if k not in saved]
        if extra or (missing and not partial):
            return f"{where} has {'unknown' if extra else 'no'} {_shown((extra or missing)[0])}"
        for key, value in saved.items():
            problem = structure_problem(value, like[key], f"{where}, {key}")
            if problem:
                return problem
        return None
    if isinstance(like, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(like):
            return f"{where} is {_shown(saved)}, not a list of {len(like)}"
        for index, (value, like_value) in enumerate(zip(saved, like)):
            problem = structure_problem(value, like_value, f"{where}[{index}]")
            if problem:
                return problem
        return None
    if like is None:
        ok = saved is None or isinstance(saved, (bool, str)) or _is_number(saved)
    elif isinstance(like, bool):
        ok = saved is None or isinstance(saved, bool)
    elif isinstance(like, (int, float)):  # an int for a float or the reverse is fine; inf only where inf is
        ok = _is_number(saved) or (isinstance(saved, float) and isinstance(like, float) and not math.isfinite(like))
    elif isinstance(like, str):
        ok = isinstance(saved, str)
    else:
        ok = type(saved) is type(like)
    return None if ok else f"{where} is {_shown(saved)}, not like {_shown(like)}"


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
