"""A run's files for previews: its LoRA files in epoch order (the grid's rows), the settings it was trained
with and the base checkpoint it recorded, and choosing a run of a version."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import TrainConfig
from ..errors import UserError
from ..fileio import read_json

if TYPE_CHECKING:
    from ..store import Version

_EPOCH_IN_NAME = re.compile(r"-(\d{6})(?:-interrupted)?$")


@dataclass(frozen=True)
class RunFile:
    """One LoRA file of a run: a row of the grid."""

    path: Path
    epoch: int
    label: str


def run_config(run_dir: Path) -> TrainConfig:
    """The settings a run was trained with (its own snapshot; keys this version does not know are skipped)."""
    path = Path(run_dir) / "settings.json"
    try:
        data = read_json(path, "train a new run to preview", what="The run's settings file")
    except FileNotFoundError:
        return TrainConfig()
    if not isinstance(data, dict):
        raise UserError(f"The run's settings file {path} is not a table of settings; train a new run to preview.")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig.from_dict({k: v for k, v in data.items() if k in known})


def run_checkpoint(run_dir: Path) -> Path | None:
    """The base checkpoint a run recorded, if that file still exists."""
    try:
        data = read_json(Path(run_dir) / "settings.json", "choose the base model")
    except (OSError, UserError):
        return None
    recorded = data.get("base_model_path") if isinstance(data, dict) else None
    if isinstance(recorded, str) and recorded and Path(recorded).is_file():
        return Path(recorded)
    return None


def choose_run(version: Version, run: str | None = None) -> Path:
    """A run folder of ``version`` by name, or its newest run."""
    runs = version.runs()
    if not runs:
        raise UserError(f"Version '{version.name}' of '{version.project}' has no training runs yet; train first.")
    if not run:
        return runs[-1]
    for path in runs:
        if path.name == run:
            return path
    raise UserError(f"Version '{version.name}' has no run '{run}'; its runs are: {', '.join(p.name for p in runs)}.")


def run_lora_files(run_dir: Path) -> list[RunFile]:
    """The run's LoRA files in epoch order (epoch from the file's ``ss_epoch``, else from its name)."""
    files = []
    for path in sorted(Path(run_dir).glob("*.safetensors")):
        if path.name.startswith("."):
            continue
        epoch = _file_epoch(path)
        label = f"epoch {epoch}" + (" (stopped)" if "interrupted" in path.stem else "")
        files.append(RunFile(path, epoch, label))
    if not files:
        raise UserError(f"The run {Path(run_dir).name} has no LoRA files to preview; train (longer) first.")
    return sorted(files, key=lambda f: (f.epoch, f.path.name))


def _file_epoch(path: Path) -> int:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            value = (fh.metadata() or {}).get("ss_epoch")
        if value is not None:
            return int(value)
    except (OSError, ValueError, SafetensorError):
        pass
    match = _EPOCH_IN_NAME.search(path.stem)
    return int(match.group(1)) if match else 0
