"""Preparing a version for training: its pictures and class pictures brought up to date with its settings.

The one way the command line, the tab and the trainer prepare a version (captioner included), so they always
agree on the captions. Light: no torch, so the tab can call it before any training is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import TrainConfig
from ..devicelock import hold_version
from ..errors import UserError
from ..progress import ProgressFn, Reporter, StopFlag, Stopped, TaskFn
from ..store import Version
from .items import DatasetItem, load_items
from .prepare_folder import prepare_dataset
from .prepare_options import PrepareOptions
from .reports import PrepareReport, Refusal

# What preparing reports to a Reporter's ``task`` (the tab's bar, the terminal's, the WebUI's).
PREPARING = "Preparing pictures"
PREPARING_CLASS = "Preparing class pictures"
DOWNLOADING = "Downloading the captioner (first use only)"


def prepare_version(
    version: Version, config: TrainConfig, *, host: Any = None, task: TaskFn | None = None
) -> PrepareReport:
    """Bring ``prepared/`` up to date with the originals and the settings (captioner included): the one way
    the command line, the tab and the trainer prepare a version, so they always agree on the captions.

    ``task`` (a ``Reporter.task``) hears (what, done, total, unit) as it goes: the pictures, the class
    pictures, and the bytes of a captioner's model while it is downloaded, the first time it is used."""

    def reporting(what: str, unit: str = "") -> ProgressFn | None:
        return None if task is None else (lambda done, total: task(what, done, total, unit))

    # One writer of prepared/ at a time: never under a run of this version (which reads it), nor beside
    # another update. The run, the command line and the tab already hold it (the lock is re-entrant).
    with hold_version(version.path, f"{version.project} / {version.name} (preparing its pictures)"):
        return _prepare_version(version, config, host=host, reporting=reporting)


def _prepare_version(
    version: Version, config: TrainConfig, *, host: Any, reporting: Callable[..., ProgressFn | None]
) -> PrepareReport:
    from .captioners import captioner_from_config

    models_dir = getattr(host, "models_dir", None) or version.data_dir / "models"
    options = PrepareOptions.from_config(config, trigger_word_default=version.project)
    auto_caption = captioner_from_config(config, models_dir=models_dir, host=host, progress=reporting(DOWNLOADING, "B"))
    try:
        report = prepare_dataset(
            version.originals_dir, version.prepared_dir, options, reporting(PREPARING), auto_caption=auto_caption
        )
    finally:
        close = getattr(auto_caption, "close", None)
        if callable(close):
            close()  # a host's captioner frees its model (the WebUI's DeepBooru, BLIP)
    reg_report = prepare_reg(version, config, reporting(PREPARING_CLASS))
    if reg_report is not None:
        report.refused += [Refusal(f"class picture {r.name}", r.reason) for r in reg_report.refused]
    return report


class FixedCaption:
    """The caption of class pictures that came without a .txt: the ``reg_caption`` setting, whatever the picture.

    It takes the place of an automatic captioner in ``prepare_dataset``; its repr names the text, so the
    prepared folder's manifest notices a changed setting and rewrites those captions.
    """

    def __init__(self, text: str) -> None:
        self.text = " ".join(str(text or "").split())

    def __call__(self, image: Any) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"FixedCaption({self.text!r})"


def reg_prepare_options(config: TrainConfig) -> PrepareOptions:
    """The training pictures' options for the class pictures, but for the captions: a class picture's own .txt
    or else ``reg_caption``, and never the trigger word (class pictures show the class, not the subject)."""
    options = PrepareOptions.from_config(config)
    options.caption_mode = "use"
    options.trigger_word = ""
    return options


def prepare_reg(version: Version, config: TrainConfig, progress: ProgressFn | None = None) -> PrepareReport | None:
    """Bring ``prepared_reg/`` up to date with ``reg/`` (the optional class pictures); None when the version has
    neither. A ``reg/`` emptied by the user empties ``prepared_reg/`` too."""
    if not version.reg_dir.is_dir() and not version.prepared_reg_dir.is_dir():
        return None
    return prepare_dataset(
        version.reg_dir,
        version.prepared_reg_dir,
        reg_prepare_options(config),
        progress,
        auto_caption=FixedCaption(config.reg_caption),
    )


def load_reg_items(version: Version) -> list[DatasetItem]:
    """The prepared class pictures of ``version`` (none when it has no regularisation pictures)."""
    return load_items(version.prepared_reg_dir)


def prepare_items(
    version: Version, config: TrainConfig, reporter: Reporter, *, host: Any = None, stop: StopFlag | None = None
) -> list[DatasetItem]:
    """Bring ``prepared/`` up to date with the originals and the settings, and read it; the reporter hears
    the progress (``Reporter.task``) and the pictures that could not be used.

    A ``stop`` requested meanwhile raises ``Stopped`` at the next picture (or downloaded chunk). What was
    done is kept on disk; the next preparation redoes what its manifest does not vouch for."""

    def task(what: str, done: int, total: int, unit: str = "") -> None:
        reporter.task(what, done, total, unit)
        if stop is not None and stop.requested:
            raise Stopped

    report = prepare_version(version, config, host=host, task=task)
    for refusal in report.refused:
        reporter.message(f"skipped {refusal}")
    items = load_items(version.prepared_dir)
    if not items:
        raise UserError(
            f"Version '{version.name}' of '{version.project}' has no usable images; add pictures "
            "with 'python -m train_tools dataset add' or the Upload Dataset button."
        )
    return items
