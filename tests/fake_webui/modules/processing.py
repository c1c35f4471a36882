"""Stand-in txt2img: the parts of ``modules.processing`` an extension uses to make pictures.

Like the WebUI it applies ``override_settings`` for one generation (and restores them), and finds each
``<lora:name:weight>`` of the prompt by file name in the Lora folder (``--lora-dir`` or ``models/Lora``,
subfolders included); a name it cannot find is skipped, as the WebUI does. Every call is recorded in ``calls``.
The picture is noise seeded by what decides a real picture (seed, prompt without the tags, sizes, sampler,
checkpoint, and the found LoRA files' bytes with their weights), so equal requests give equal pictures.
Each call also records where the loaded checkpoint was (``model_device``: None when none is loaded), so tests
can tell a picture made with the model back on the GPU from one made while it was moved off.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from modules import paths_internal, sd_models, shared

calls: list[dict[str, Any]] = []

_NETWORK = re.compile(r"<(lora|lyco):([^>]+)>")
_ACCEPTED = {
    "sd_model",
    "outpath_samples",
    "outpath_grids",
    "prompt",
    "negative_prompt",
    "styles",
    "seed",
    "subseed",
    "subseed_strength",
    "sampler_name",
    "scheduler",
    "batch_size",
    "n_iter",
    "steps",
    "cfg_scale",
    "width",
    "height",
    "restore_faces",
    "tiling",
    "do_not_save_samples",
    "do_not_save_grid",
    "override_settings",
    "override_settings_restore_afterwards",
    "enable_hr",
}


class StableDiffusionProcessingTxt2Img:
    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - _ACCEPTED
        if unknown:
            raise TypeError(f"StableDiffusionProcessingTxt2Img got unexpected arguments {sorted(unknown)}")
        self.prompt = ""
        self.negative_prompt = ""
        self.seed = -1
        self.sampler_name = None
        self.steps = 50
        self.cfg_scale = 7.0
        self.width = 512
        self.height = 512
        self.batch_size = 1
        self.n_iter = 1
        self.override_settings: dict[str, Any] = {}
        self.override_settings_restore_afterwards = True
        self.do_not_save_samples = False
        self.do_not_save_grid = False
        self.closed = False
        for key, value in kwargs.items():
            setattr(self, key, value)

    def close(self) -> None:
        self.closed = True


class Processed:
    def __init__(self, p: StableDiffusionProcessingTxt2Img, images: list[Image.Image], info: str = "") -> None:
        self.images = images
        self.prompt = p.prompt
        self.seed = p.seed
        self.info = info


def lora_dir() -> Path:
    return Path(shared.cmd_opts.lora_dir or os.path.join(paths_internal.models_path, "Lora"))


def find_network(name: str) -> Path | None:
    folder = lora_dir()
    if not folder.is_dir():
        return None
    for path in sorted(folder.rglob("*.safetensors")):
        if path.stem == name:
            return path
    return None


def process_images(p: StableDiffusionProcessingTxt2Img) -> Processed:
    saved = {key: getattr(shared.opts, key, None) for key in p.override_settings}
    for key, value in p.override_settings.items():
        setattr(shared.opts, key, value)
    try:
        networks = []
        for _kind, args in _NETWORK.findall(p.prompt):
            name, _, weight = args.partition(":")
            path = find_network(name)
            networks.append(
                {
                    "name": name,
                    "weight": float(weight or 1.0),
                    "path": path,
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest() if path else None,
                }
            )
        checkpoint = getattr(shared.opts, "sd_model_checkpoint", None)
        calls.append(
            {
                "prompt": p.prompt,
                "negative_prompt": p.negative_prompt,
                "seed": p.seed,
                "steps": p.steps,
                "cfg_scale": p.cfg_scale,
                "sampler_name": p.sampler_name,
                "size": (p.width, p.height),
                "networks": networks,
                "checkpoint": checkpoint,
                "clip_skip": getattr(shared.opts, "CLIP_stop_at_last_layers", None),
                "saves": not (p.do_not_save_samples and p.do_not_save_grid),
                "model_device": getattr(sd_models.model_data.sd_model, "device", None),
            }
        )
        if shared.state.interrupted:
            return Processed(p, [])
        clean = _NETWORK.sub("", p.prompt)
        key = repr(
            (
                p.seed,
                clean,
                p.negative_prompt,
                p.steps,
                p.cfg_scale,
                p.sampler_name,
                p.width,
                p.height,
                checkpoint,
                [(n["sha256"], n["weight"]) for n in networks if n["path"]],
            )
        )
        rng = np.random.default_rng(int(hashlib.sha256(key.encode()).hexdigest()[:16], 16))
        pixels = rng.integers(0, 256, size=(p.height, p.width, 3), dtype=np.uint8)
        return Processed(p, [Image.fromarray(pixels)])
    finally:
        if p.override_settings_restore_afterwards:
            for key, value in saved.items():
                setattr(shared.opts, key, value)
