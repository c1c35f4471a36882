"""Presets: a version's settings saved under a name and applied to another version (tab and CLI), and a few
built-in ones from the peers' published recommendations.

A preset holds every training setting except the version's own: its base model, trigger word, captions of the
class pictures, output name, preview prompt and the LoRA it trains on from. The user's presets are JSON files in
``<data>/outputs/train_tools/presets/``; a built-in name cannot be saved over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .errors import UserError
from .fileio import read_json, write_json
from .names import check_name

#: The settings that belong to a version (its model and its data), never carried by a preset.
VERSION_OWN = ("base_model", "trigger_word", "reg_caption", "output_name", "preview_prompt", "network_weights")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    settings: dict[str, Any] = field(default_factory=dict)


BUILTIN: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "SD1.5 character",
            "The character recipe of Hollowstrawberry's kohya-colab Lora Trainer (its defaults): dim 16 / alpha 8, "
            "UNet 5e-4, text encoder 1e-4, cosine with restarts, min-SNR 5, 10 repeats x 10 epochs, batch 2, "
            "shuffled tags with the first kept. AdamW here where it uses AdamW8bit (the same update without "
            "bitsandbytes).",
            {
                "resolution": 512,
                "network_type": "lora",
                "network_dim": 16,
                "network_alpha": 8.0,
                "conv_dim": 0,
                "optimizer": "AdamW",
                "learning_rate": 5e-4,
                "unet_lr": 5e-4,
                "text_encoder_lr": 1e-4,
                "train_text_encoder": True,
                "lr_scheduler": "cosine_with_restarts",
                "min_snr_gamma": 5.0,
                "repeats": 10,
                "epochs": 10,
                "save_every_n_epochs": 1,
                "batch_size": 2,
                "shuffle_caption": True,
                "keep_tokens": 1,
                "clip_skip": 2,
                "mixed_precision": "fp16",
            },
        ),
        Preset(
            "SDXL style, 8 GB",
            "kohya sd-scripts' SDXL LoRA guide (docs/sdxl_train_network.md): dim 32 / alpha 16, UNet 1e-4, "
            "cosine with restarts, 100 warm-up steps, 10 epochs, bf16, gradient checkpointing, cached latents; "
            "for little VRAM the UNet alone with the text encoders' outputs cached, as the guide advises. AdamW "
            "here where it uses AdamW8bit.",
            {
                "resolution": 1024,
                "min_bucket_reso": 512,
                "max_bucket_reso": 2048,
                "network_type": "lora",
                "network_dim": 32,
                "network_alpha": 16.0,
                "conv_dim": 0,
                "optimizer": "AdamW",
                "learning_rate": 1e-4,
                "unet_lr": 1e-4,
                "text_encoder_lr": 0.0,
                "train_text_encoder": False,
                "lr_scheduler": "cosine_with_restarts",
                "lr_warmup_steps": 100,
                "epochs": 10,
                "save_every_n_epochs": 1,
                "batch_size": 1,
                "mixed_precision": "bf16",
                "gradient_checkpointing": True,
                "cache_latents": True,
                "clip_skip": 1,
            },
        ),
    )
}


def presets_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "outputs" / "train_tools" / "presets"


def preset_names(data_dir: Path) -> list[str]:
    """The built-in presets, then the user's, by name."""
    folder = presets_dir(data_dir)
    own = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
    return list(BUILTIN) + [name for name in own if name not in BUILTIN]


def preset_settings(config: TrainConfig) -> dict[str, Any]:
    """What a preset of ``config`` holds: every setting but the version's own (``VERSION_OWN``)."""
    return {k: v for k, v in config.to_dict().items() if k not in VERSION_OWN}


def save_preset(data_dir: Path, name: str, config: TrainConfig, description: str = "") -> Path:
    """Save ``config``'s settings as the user's preset ``name`` (replacing one of that name)."""
    name = check_name(name, "preset name")
    if name in BUILTIN:
        raise UserError(f"'{name}' is a built-in preset; save yours under another name.")
    path = presets_dir(data_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"description": description, "settings": preset_settings(config)})
    return path


def load_preset(data_dir: Path, name: str) -> Preset:
    """The preset ``name``, built in or the user's; its settings checked as a version's are."""
    if name in BUILTIN:
        return BUILTIN[name]
    name = check_name(name, "preset name")
    path = presets_dir(data_dir) / f"{name}.json"
    if not path.is_file():
        raise UserError(f"There is no preset '{name}'; the presets are: {', '.join(preset_names(data_dir))}.")
    found = read_json(path, "save the preset again", what=f"The preset '{name}'")
    settings = found.get("settings") if isinstance(found, dict) else None
    if not isinstance(settings, dict):
        raise UserError(f"The preset '{name}' ({path}) holds no settings; save the preset again.")
    settings = {k: v for k, v in settings.items() if k not in VERSION_OWN}
    TrainConfig().updated(settings)  # every key known, every value valid: refused with the setting's name
    return Preset(name, str(found.get("description", "")), settings)


def apply_preset(config: TrainConfig, preset: Preset) -> TrainConfig:
    """``config`` with the preset's settings over it (the version's own settings kept)."""
    return config.updated({k: v for k, v in preset.settings.items() if k not in VERSION_OWN})


__all__ = ["BUILTIN", "Preset", "apply_preset", "load_preset", "preset_names", "save_preset"]
