"""Checks of a loaded training state, so that a damaged or hand-edited one stops with one sentence, never a
traceback and never a run that "finishes" having skipped its work: the type of every field when it is read
(``type_problem``, by ``state_files.load_state``), whether it holds together when the run is opened
(``consistency_problem``, by ``resume.resume_point``), and whether it fits the run, its batches, LoRA,
optimizer, schedule and generators, before the trainer restores it (``fit_problem``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeGuard

import torch

from ..config import TrainConfig
from ..errors import UserError
from .state import FINAL, INTERRUPT, KIND_ORDER, TrainState

_HUGE = 1 << 62


def _is_int(value: Any) -> bool:
    """A whole number a tensor or a message can hold (a hostile one may have thousands of digits)."""
    return isinstance(value, int) and not isinstance(value, bool) and -_HUGE < value < _HUGE


def is_number(value: Any) -> TypeGuard[int | float]:
    """A finite int or float (not a bool; not an int too large for a float or a tensor)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return _is_int(value)


def _is_plain(value: Any) -> bool:
    """None, a bool, a finite number or a short text: what an optimizer keeps beside its tensors."""
    return value is None or isinstance(value, bool) or is_number(value) or (isinstance(value, str) and len(value) < 100)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def type_problem(obj: dict[str, Any]) -> str | None:
    """What in a loaded state's fields has the wrong type, or None."""
    for key in ("epoch", "batch", "step", "format"):
        if not _is_int(obj[key]):
            return f"its {key} is {_shown(obj[key])}, not a whole number"
    checks: list[tuple[str, bool, str]] = [
        ("kind", isinstance(obj["kind"], str) and obj["kind"] in KIND_ORDER, f"one of {', '.join(KIND_ORDER)}"),
        ("finished", isinstance(obj["finished"], bool), "true or false"),
        (
            "config",
            isinstance(obj["config"], dict) and all(isinstance(k, str) for k in obj["config"]),
            "a table of settings",
        ),
        ("base_model_path", isinstance(obj["base_model_path"], str), "a file path"),
        (
            "base_sha256",
            obj["base_sha256"] is None
            or (isinstance(obj["base_sha256"], str) and bool(re.fullmatch(r"[0-9a-f]{64}", obj["base_sha256"]))),
            "a sha256",
        ),
        ("started_at", is_number(obj["started_at"]) and obj["started_at"] >= 0, "a time"),
        ("files", _is_str_list(obj["files"]), "a list of file names"),
        ("losses", isinstance(obj["losses"], list) and all(is_number(v) for v in obj["losses"]), "a list of numbers"),
        ("items", _is_str_list(obj["items"]), "a list of picture names"),
        (
            "lora",
            isinstance(obj["lora"], dict)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj["lora"].items()),
            "a table of tensors",
        ),
        ("optimizer", isinstance(obj["optimizer"], dict), "a table"),
        ("scheduler", isinstance(obj["scheduler"], dict), "a table"),
        ("scaler", obj["scaler"] is None or isinstance(obj["scaler"], dict), "a table"),
        ("rng", isinstance(obj["rng"], list) and all(isinstance(v, dict) for v in obj["rng"]), "a list of tables"),
    ]
    for key, ok, expected in checks:
        if not ok:
            return f"its {key} is {_shown(obj[key])}, not {expected}"
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


def damaged(run_dir: Path, problem: str) -> UserError:
    """The error for a state that does not hold together or does not fit its run."""
    return UserError(f"The saved training state of run {Path(run_dir).name} is damaged ({problem}); start a new run.")


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
        return (
            f"it is a {state.kind} state at epoch {state.epoch} of {epochs}, "
            f"{'finished' if state.finished else 'not finished'}; those do not go together"
        )
    if state.kind != INTERRUPT and state.batch != 0:
        return f"a {state.kind} state is made at the end of an epoch, not after batch {state.batch}"
    if len(state.losses) != state.step:
        return f"it holds {len(state.losses)} losses for {state.step} steps"
    for name in state.files:
        if not _plain_lora_name(name):
            return f"{_shown(name)} is not the name of a LoRA file in the run folder"
    if state.finished and not (state.files and is_final_file(Path(state.files[-1]))):
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
    return (
        name.endswith(".safetensors")
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and ":" not in name
        and Path(name).name == name
    )


def fit_problem(
    state: TrainState,
    *,
    batch_counts: list[int],
    weights: Mapping[str, torch.Tensor],
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    rng_now: dict[str, Any],
    ticks: int = 1,
) -> str | None:
    """What in ``state`` does not fit the run it resumes, or None: ``batch_counts`` are the batches of each
    epoch (``batch_counts[0]`` of epoch 1), ``weights`` the LoRA weights built for the run (names already
    checked), the optimizer, schedule and gradient scaler those of the run before any step, ``rng_now`` what
    ``capture_rng`` gives now, ``ticks`` the schedule's steps per training step (one per process)."""
    epochs = len(batch_counts)
    if state.epoch <= epochs:
        in_epoch = batch_counts[state.epoch - 1]
        if state.batch > in_epoch:
            return (
                f"batch {state.batch} is past the end of epoch {state.epoch}, which has {in_epoch} "
                f"batch{'es' if in_epoch != 1 else ''}"
            )
    expected = sum(batch_counts[: state.epoch - 1]) + state.batch
    if state.step != expected:
        return f"step {state.step} is not where batch {state.batch} of epoch {state.epoch} ends (step {expected})"
    for name, param in weights.items():
        saved = state.lora[name]
        if tuple(saved.shape) != tuple(param.shape) or not saved.is_floating_point():
            return f"LoRA weight {_shown(name)} is {_shown(saved)} of {saved.dtype}, not of shape {tuple(param.shape)}"
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
    for index, saved_rng in enumerate(state.rng):
        problem = _rng_problem(saved_rng, rng_now, f"the random-number generators of process {index}")
        if problem:
            return problem
    return None


# The per-weight optimizer states that are float tensors of the weight's own shape (AdamW, SGD, Lion, Prodigy,
# AdaFactor unfactored; Prodigy's p0 and s may be slices), and those of bitsandbytes' 8-bit optimizers
# (quantized: any dtype).
_WEIGHT_SHAPED = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"})
_WEIGHT_SHAPED_8BIT = frozenset({"state1", "state2"})
# The states that are tensors whenever an optimizer writes them (an 8-bit one's quantisation maps and scales too).
_TENSORS_ONLY = _WEIGHT_SHAPED | _WEIGHT_SHAPED_8BIT | {"qmap1", "qmap2", "absmax1", "absmax2"}
# bitsandbytes 0.48+ writes a weight's 8-bit states (state1/2, qmap1/2, absmax1/2) in one table under this name.
_BNB_PACKED = "__bnb_optimizer_quant_state__"


def _weight_states(values: dict[str, Any]) -> list[tuple[str, Any]]:
    """A weight's optimizer states by name, bitsandbytes' packed table unpacked (a packed table that is not
    a table stays whole, and is refused as not plain)."""
    out: list[tuple[str, Any]] = []
    for name, value in values.items():
        if name == _BNB_PACKED and isinstance(value, dict) and all(isinstance(k, str) for k in value):
            out += [(k, v) for k, v in value.items() if k != _BNB_PACKED]
        else:
            out.append((name, value))
    return out


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
    for index, (group, live_group, tensors) in enumerate(
        zip(groups, live_groups, optimizer.param_groups, strict=False)
    ):
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
        params.update(zip(live_group["params"], tensors["params"], strict=False))
    per_weight = saved["state"]
    if not isinstance(per_weight, dict):
        return "the optimizer's state is not one torch writes"
    for key, values in per_weight.items():
        if not _is_int(key) or key not in params or not isinstance(values, dict):
            return "the optimizer's state names weights the run does not have"
        shape = tuple(params[key].shape)
        for name, value in _weight_states(values):
            if isinstance(value, torch.Tensor):
                wrong = (
                    (name in _WEIGHT_SHAPED and not value.is_floating_point())
                    or (name in _WEIGHT_SHAPED | _WEIGHT_SHAPED_8BIT and tuple(value.shape) != shape)
                    or (name == "step" and value.numel() != 1)
                )
                if wrong:
                    return f"the optimizer's {_shown(name)} of weight {key} is {_shown(value)} of {value.dtype}"
            elif name in _TENSORS_ONLY or not _is_plain(value):
                return f"the optimizer's {_shown(name)} of weight {key} is {_shown(value)}"
    return None


def _rng_problem(saved: dict[str, Any], now: dict[str, Any], where: str) -> str | None:
    """A saved generator state against the generators of now: the same kinds of the same sizes. GPUs may
    differ in number (``restore_rng`` then leaves theirs), numpy may be missing on either side."""
    skip = {"cuda", "numpy"}
    problem = structure_problem(
        {k: v for k, v in saved.items() if k not in skip}, {k: v for k, v in now.items() if k not in skip}, where
    )
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
        for index, (value, like_value) in enumerate(zip(saved, like, strict=False)):
            problem = structure_problem(value, like_value, f"{where}[{index}]")
            if problem:
                return problem
        return None
    if like is None:
        ok = saved is None or isinstance(saved, (bool, str)) or is_number(saved)
    elif isinstance(like, bool):
        ok = saved is None or isinstance(saved, bool)
    elif isinstance(like, (int, float)):  # an int for a float or the reverse is fine; inf only where inf is
        ok = is_number(saved) or (isinstance(saved, float) and isinstance(like, float) and not math.isfinite(like))
    elif isinstance(like, str):
        ok = isinstance(saved, str)
    else:
        ok = type(saved) is type(like)
    return None if ok else f"{where} is {_shown(saved)}, not like {_shown(like)}"


def is_final_file(path: Path) -> bool:
    """``<name>.safetensors`` rather than an epoch's ``<name>-000003`` or ``<name>-000003-interrupted``."""
    tail = path.stem.rsplit("-", 1)[-1]
    return not (len(tail) == 6 and tail.isdigit()) and tail != "interrupted"
