"""Automatic captioners: the interface, and choosing one (``make_captioner``, ``captioner_from_config``): a
WD14 tagger (booru tags, ``wd14.py``), BLIP (one sentence, ``blip.py``), or one the host offers.

``prepare_dataset(..., auto_caption=captioner)`` calls a captioner once per picture and caches its answer in
the manifest under the captioner's ``repr``; the ``repr`` of the captioner classes names the model and every
setting that changes the answer, so changing a threshold re-captions and nothing else does.

Models are found on disk first and downloaded once otherwise; offline, the error says where to put the files.
Heavy imports (onnxruntime, transformers) and model loading wait for the first picture, so a captioner whose
answers are all cached costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..errors import UserError
from ..progress import ProgressFn
from .blip import DEFAULT_BLIP_REPO, BlipCaptioner
from .wd14 import DEFAULT_WD14_REPO, WD14Tagger, ensure_wd14

if TYPE_CHECKING:
    from ..config import TrainConfig

Captioner = Callable[[Image.Image], str]

KINDS = ("none", "wd14", "blip")


def make_captioner(kind: str, *, models_dir: Path, host: Any = None, **options: Any) -> Captioner | None:
    """The captioner of ``kind`` ("none", "wd14", "blip", or one the host offers such as "deepbooru").

    A host (``train_tools.hosts.base.Host``) whose ``captioner(kind)`` returns a callable supplies it instead: the
    WebUI's own BLIP and DeepBooru interrogators are already downloaded and share the GPU politely.
    Options: for wd14 ``repo``, ``general_threshold``, ``character_threshold``, ``include_rating``,
    ``exclude``, ``underscores_to_spaces``, ``providers``, ``device`` ("cpu" keeps it off the GPU); for blip
    ``model`` (a folder or repository),
    ``device``, ``max_new_tokens``, ``prompt``; for both ``allow_download`` and ``progress`` (bytes, total).
    """
    kind = (kind or "none").strip().lower()
    if kind == "none":
        return None
    provided = getattr(host, "captioner", None)
    hosted = provided(kind) if callable(provided) else None
    if hosted is not None:
        return hosted
    download = {"allow_download": options.pop("allow_download", None), "progress": options.pop("progress", None)}
    if kind == "wd14":
        device = str(options.pop("device", "") or "")
        if device.startswith("cpu") and not options.get("providers"):
            options["providers"] = ["CPUExecutionProvider"]
        model, tags = ensure_wd14(models_dir, options.pop("repo", DEFAULT_WD14_REPO), **download)
        return WD14Tagger(model, tags, **options)
    if kind == "blip":
        return BlipCaptioner(options.pop("model", DEFAULT_BLIP_REPO), models_dir=models_dir, **download, **options)
    if kind == "deepbooru":
        raise UserError(
            "The DeepBooru captioner is the WebUI's own: it works in the Train Tools tab inside the "
            "WebUI. Here, choose wd14 (booru tags like DeepBooru's) or blip."
        )
    raise UserError(f"Automatic captioner must be one of {', '.join(KINDS)}; got '{kind}'.")


def captioner_from_config(
    config: TrainConfig, *, models_dir: Path, host: Any = None, progress: ProgressFn | None = None, **options: Any
) -> Captioner | None:
    """``make_captioner`` with the settings of a training config (the ``captioner`` and ``tagger_*`` fields)."""
    if config.captioner == "wd14":
        options = {
            "general_threshold": config.tagger_general_threshold,
            "character_threshold": config.tagger_character_threshold,
            "include_rating": config.tagger_include_rating,
            "exclude": config.tagger_exclude,
            **options,
        }
    return make_captioner(config.captioner, models_dir=models_dir, host=host, progress=progress, **options)
