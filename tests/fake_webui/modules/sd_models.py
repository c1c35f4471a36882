"""Stand-in checkpoint list and model (un)loading, recording what the extension asks for."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from modules import paths_internal, shared

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


class CheckpointInfo:
    def __init__(self, filename: str) -> None:
        self.filename = os.path.abspath(filename)
        root = shared.cmd_opts.ckpt_dir or os.path.join(paths_internal.models_path, "Stable-diffusion")
        rel = (
            os.path.relpath(self.filename, root)
            if self.filename.startswith(os.path.abspath(root))
            else os.path.basename(filename)
        )
        self.name = rel.replace("\\", "/")
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(self.name)[0]
        self.shorthash = hashlib.sha256(self.name.encode()).hexdigest()[:10]
        self.sha256 = None
        self.title = f"{self.name} [{self.shorthash}]"
        self.metadata: dict[str, Any] = {}


checkpoints_list: dict[str, CheckpointInfo] = {}


class ModelData:
    def __init__(self) -> None:
        self.sd_model: Any = None


model_data = ModelData()
calls: list[str] = []


def list_models() -> None:
    checkpoints_list.clear()
    folders = [os.path.join(paths_internal.models_path, "Stable-diffusion")]
    if shared.cmd_opts.ckpt_dir:
        folders.insert(0, shared.cmd_opts.ckpt_dir)
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for dirpath, _dirs, files in os.walk(folder):
            for name in sorted(files):
                if name.lower().endswith(CHECKPOINT_SUFFIXES):
                    info = CheckpointInfo(os.path.join(dirpath, name))
                    checkpoints_list[info.title] = info


def get_closet_checkpoint_match(search: str) -> CheckpointInfo | None:
    if not search:
        return None
    found = sorted(
        (info for info in checkpoints_list.values() if search in info.title), key=lambda info: len(info.title)
    )
    return found[0] if found else None


def unload_model_weights(sd_model: Any = None, info: Any = None) -> Any:
    calls.append("unload")
    if model_data.sd_model is not None:
        model_data.sd_model.device = "cpu"
    return model_data.sd_model


def reload_model_weights(sd_model: Any = None, info: Any = None, forced_reload: bool = False) -> Any:
    calls.append("reload")
    if model_data.sd_model is not None:
        model_data.sd_model.device = "cuda"
    return model_data.sd_model
