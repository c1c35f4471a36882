"""The tab's small calls into the core: the dataset code (uploads, preparing, items, tags), a checkpoint's
family, the demo pictures, and the work of Generate previews.

The tab reaches the dataset code only through these few functions, so a renamed core function is a one-line
change here. Each imports what it calls when it runs, so importing this module stays light.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..demo_settings import DEMO_CLASS_PICTURES, DEMO_PICTURES
from ..errors import UserError
from ..hosts.base import DEMO_CHOICE, Host
from ..progress import TaskFn
from ..store import Version

log = logging.getLogger(__name__)


def ds_image_suffixes() -> tuple[str, ...]:
    from ..data.layout import IMAGE_SUFFIXES

    return IMAGE_SUFFIXES


def core_add_originals(paths: Sequence[Path], version: Version) -> str:
    from ..data.uploads import add_originals

    report = add_originals(list(paths), version.originals_dir)
    return str(report.summary())


def core_add_reg(paths: Sequence[Path], version: Version) -> str:
    """Class (regularisation) pictures go to the version's ``reg/``, beside, never into, its dataset."""
    from ..data.uploads import add_originals

    report = add_originals(list(paths), version.reg_dir)
    return f"Class pictures: {report.summary()}"


def core_reg_count(version: Version) -> int:
    """How many class pictures the version has: the prepared ones, or the uploaded ones before preparing."""
    prepared = version.prepared_reg_dir
    count = sum(1 for p in prepared.glob("*.png") if not p.name.startswith(".")) if prepared.is_dir() else 0
    if count:
        return count
    folder = version.reg_dir
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in ds_image_suffixes() and p.is_file())


def core_prepare(version: Version, config: TrainConfig, host: Any = None, task: TaskFn | None = None) -> str:
    """Prepare ``version``; ``task`` hears its progress (see ``prepare_version``)."""
    from ..data.preparation import prepare_version

    report = prepare_version(version, config, host=host, task=task)
    refused = list(getattr(report, "refused", []) or [])
    return f"Skipped {len(refused)}: " + "; ".join(str(r) for r in refused[:5]) if refused else ""


def core_tag_counts(version: Version) -> list[tuple[str, int]]:
    if not version.prepared_dir.is_dir():
        return []
    from ..data.captions import tag_counts

    return tag_counts(version.prepared_dir)


def core_family(host: Host, choice: str | None) -> str:
    """The family of the chosen checkpoint ("sd1", "sd2", "sd2v", "sdxl"), read from its header; "" if unknown."""
    if not choice:
        return ""
    if choice == DEMO_CHOICE:
        return "sd1"
    from ..models.detect import detect_checkpoint_family

    try:
        return detect_checkpoint_family(host.resolve_checkpoint(choice))
    except (UserError, OSError, ValueError) as exc:
        log.debug("Cannot tell the family of %s: %s", choice, exc)
        return ""


def core_unsupported_family(host: Host, choice: str | None) -> str:
    """The title of a newer family the chosen file is of ("FLUX.1-dev", "SD3.5 Large" ...), which this version
    cannot train; "" for anything else."""
    if not choice or choice == DEMO_CHOICE:
        return ""
    from ..models.detect import detect_dit_family

    try:
        found = detect_dit_family(host.resolve_checkpoint(choice))
    except (UserError, OSError) as exc:
        log.debug("Cannot read %s: %s", choice, exc)
        return ""
    return found.title if found is not None else ""


def core_is_demo(host: Host, choice: str | None) -> bool:
    """Whether the chosen checkpoint is the built-in demo model (offered, or its file picked by name)."""
    if not choice:
        return False
    if choice == DEMO_CHOICE:
        return True
    from ..models.demo_model import is_demo_checkpoint

    try:
        return is_demo_checkpoint(host.resolve_checkpoint(choice))
    except (UserError, OSError) as exc:
        log.debug("Cannot tell whether %s is the demo model: %s", choice, exc)
        return False


def core_demo_estimate(config: Any, pictures: int, class_pictures: int, device: str | None) -> str:
    """How long a run of ``config`` on the demo model takes here, as a phrase ("about 60 s on this machine
    (155 steps ...)"), measured on ``device`` (see training/estimate.py)."""
    from ..training.estimate import estimate_demo_run

    return estimate_demo_run(config, pictures, device, class_pictures).sentence()


def core_fit_demo(config: Any, pictures: int, class_pictures: int, device: str | None) -> dict[str, int]:
    """The changes that fit ``config``, the demo settings, to this machine's speed: fewer epochs where the run
    would take longer than the demo's 3 minutes (``training.estimate.fit_demo_epochs``); none where it fits."""
    from ..training.estimate import fit_demo_epochs

    return fit_demo_epochs(config, pictures, device, class_pictures)[0]


def preview_work(version: Version, run_dir: Path, settings: Any, host: Host) -> Callable[..., list[Any]]:
    """The work of Generate previews: the run's checkpoint (or the chosen one), its files at each weight."""

    def work(reporter: Any, stop: Any) -> list[Any]:
        from ..previews.grid import generate_grid
        from ..previews.previewer import make_previewer
        from ..previews.runs import run_checkpoint, run_config

        config = run_config(run_dir)
        checkpoint = run_checkpoint(run_dir) or host.resolve_checkpoint(config.base_model)
        previewer = make_previewer(host, checkpoint, clip_skip=config.clip_skip, device=host.device())
        try:
            return [generate_grid(run_dir, previewer, settings, reporter=reporter, stop=stop)]
        finally:
            previewer.close()

    return work


def core_items(version: Version) -> list[Any]:
    if not version.prepared_dir.is_dir() or not any(version.prepared_dir.iterdir()):
        return []  # nothing prepared yet: no need to load the dataset code
    from ..data.items import load_items

    return list(load_items(version.prepared_dir))


def core_auto_repeats(n: int) -> int:
    from ..data.items import auto_repeats

    return int(auto_repeats(n))


def core_demo_pictures(version: Version) -> int:
    """Add the demo pictures and their class pictures; how many demo pictures were added."""
    from ..data.demo_dataset import make_demo_class_pictures, make_demo_dataset

    make_demo_class_pictures(version.reg_dir, n=DEMO_CLASS_PICTURES)
    return len(make_demo_dataset(version.originals_dir, n=DEMO_PICTURES))
