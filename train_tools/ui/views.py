"""What the tab shows of a version, computed from its files without Gradio: the settings controls' values
as a ``TrainConfig``, the dataset gallery and its summary line, the results list (and the file behind a
choice, copied into the host's Lora folder), and the newest preview grid of a run.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import fileio
from ..config import TrainConfig, fields_info
from ..demo_settings import DEMO_SETTINGS
from ..errors import UserError
from ..store import Version
from .core_calls import core_auto_repeats, core_items, core_reg_count, ds_image_suffixes
from .html import ResultFile

log = logging.getLogger(__name__)

SETTING_FIELDS = [f.name for f in fields_info()]
# The settings a checkpoint's family changes when it is picked (models.configs.family_defaults gives values).
FAMILY_FIELDS = ("resolution", "min_bucket_reso", "max_bucket_reso", "clip_skip", "gradient_checkpointing")
# The settings picking a network type sets (config_values.NETWORK_DEFAULTS gives values).
NETWORK_FIELDS = ("network_dim", "network_alpha", "conv_dim", "conv_alpha", "lokr_factor")
# The settings picking a checkpoint may change: its family's, and the demo model's (demo_settings.py).
MODEL_FIELDS = tuple(dict.fromkeys((*FAMILY_FIELDS, *DEMO_SETTINGS)))


def settings_from_values(values: Sequence[Any]) -> TrainConfig:
    """A validated TrainConfig from the settings controls' values, in ``SETTING_FIELDS`` order."""
    if len(values) != len(SETTING_FIELDS):
        raise ValueError(f"expected {len(SETTING_FIELDS)} settings values, got {len(values)}")
    data: dict[str, Any] = {}
    kinds = {f.name: f.type for f in fields_info()}
    for name, value in zip(SETTING_FIELDS, values, strict=True):
        if value is None and kinds[name] in (str, "str"):
            value = ""
        data[name] = value
    return TrainConfig.from_dict(data)


def original_images(version: Version, folder: Path | None = None) -> list[Path]:
    """The version's uploaded pictures (or those in ``folder``, e.g. its class pictures' ``reg_dir``)."""
    folder = version.originals_dir if folder is None else folder
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in ds_image_suffixes() and not p.name.lower().endswith(".mask.png") and p.is_file()
    )  # a picture's loss mask (name.mask.png) is not a picture of its own


def read_caption(image: Path) -> str:
    txt = image.with_suffix(".txt")
    try:
        return txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
    except (OSError, UnicodeDecodeError):
        return ""


def _newest_mtime(paths: Sequence[Path]) -> float:
    return max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)


def dataset_view(version: Version | None, config: TrainConfig) -> tuple[list[tuple[str, str]], str]:
    """The gallery (image, caption) and the one-line summary of what will be trained."""
    if version is None:
        return [], "Create or choose a project and a version first."
    originals = original_images(version)
    items = core_items(version)
    if items:
        gallery = [_gallery_entry(item) for item in items]
        n = len(items)
        n_reg = core_reg_count(version)
        repeats = config.repeats or core_auto_repeats(n)
        # Class pictures add as many items per epoch as the training pictures x repeats.
        per_epoch = math.ceil(n * repeats * (2 if n_reg else 1) / config.batch_size)
        classes = f" and {n_reg} class images" if n_reg else ""
        line = (
            f"{n} images{classes}, {repeats} repeats, {per_epoch} steps per epoch "
            f"({per_epoch * config.epochs} steps for {config.epochs} epochs)."
        )
        if _newest_mtime(originals) > _newest_mtime([i.image for i in items]):
            line += " New pictures were added since: press Update Dataset."
        return gallery, line
    if originals:
        gallery = [(str(p), read_caption(p) or p.name) for p in originals]
        return gallery, f"{len(originals)} pictures uploaded; press Update Dataset to prepare them."
    return [], "No pictures yet: drop 10-20 images (with their .txt captions, if any) on Upload Dataset."


def _gallery_entry(item: Any) -> tuple[str, str]:
    """A prepared picture and its caption; one with a loss mask (masked_loss) as the loss sees it, what it leaves
    out dimmed, and "[masked]" before its caption."""
    if item.mask is None:
        return str(item.image), str(item.caption)
    from ..data.layout import masked_view_path

    shown = masked_view_path(item.mask)
    return str(shown if shown.is_file() else item.image), f"[masked] {item.caption}"


def read_lora_info(path: Path) -> dict[str, str]:
    """The LoRA file's metadata, or {} when it cannot be read (a file being written, a foreign file)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types; the table shows blanks
        log.debug("Cannot read metadata of %s: %s", path, exc)
        return {}


def list_results(version: Version | None) -> list[ResultFile]:
    """Every LoRA file of every run, newest run first and, within a run, the last-saved file first (the final
    file, then the epochs before it), so the first entry is always the newest LoRA."""
    if version is None:
        return []
    out: list[ResultFile] = []
    for run in reversed(version.runs()):
        for path in sorted(run.glob("*.safetensors"), key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True):
            meta = read_lora_info(path)
            out.append(
                ResultFile(run.name, path, path.stat().st_size, meta.get("ss_epoch", ""), meta.get("ss_steps", ""))
            )
    return out


def saved_choice(files: list[ResultFile], saved: Sequence[Path]) -> str | None:
    """The results choice of the last of ``saved`` (a job's saved files) that ``files`` lists, else None."""
    by_path = {f.path.resolve(): f.choice for f in files}
    for path in reversed(saved):
        choice = by_path.get(Path(path).resolve())
        if choice is not None:
            return choice
    return None


def result_path(version: Version, choice: str) -> Path:
    """The file behind a results choice, refusing anything outside the version's runs."""
    if not choice:
        raise UserError("Choose a file in the results list first.")
    trains = version.trains_dir.resolve()
    path = (trains / choice).resolve()
    if trains not in path.parents or not path.is_file():
        raise UserError(f"'{choice}' is not a file of this version's runs; press the results refresh button.")
    return path


def copy_to_lora_dir(src: Path, lora_dir: Path) -> Path:
    """Put a LoRA file (and a preview picture beside it, if any) into the host's Lora folder."""
    target = lora_dir / src.name
    fileio.write_with(target, lambda tmp: shutil.copyfile(src, tmp))
    for suffix in (".preview.png", ".png"):
        preview = src.with_name(src.stem + suffix)
        if preview.is_file():
            fileio.write_with(lora_dir / preview.name, functools.partial(shutil.copyfile, preview))
    return target


def run_of_choice(version: Version, choice: str | None) -> Path:
    """The run folder of a results choice ("run/file"), else the newest run."""
    from ..previews.runs import choose_run

    run = choice.split("/", 1)[0] if choice and "/" in choice else None
    return choose_run(version, run)


def grid_view(version: Version | None, choice: str | None) -> tuple[str | None, str | None]:
    """(grid picture, its path for the click handler) of the chosen run's newest grid, or (None, None)."""
    if version is None or not version.runs():
        return None, None
    from ..previews.grid_info import latest_grid

    try:
        info = latest_grid(run_of_choice(version, choice))
    except UserError:
        return None, None
    return (str(info.image), str(info.image)) if info is not None else (None, None)
