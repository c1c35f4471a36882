"""The captioners' model files from Hugging Face: whether downloads are allowed (``HF_HUB_OFFLINE``), and one
file of a repository downloaded once into a folder of Train Tools', with its progress reported in bytes.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..progress import ProgressFn


def may_download(allow_download: bool | None) -> bool:
    if allow_download is not None:
        return allow_download
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("1", "true", "yes", "on")


def _progress_tqdm(progress: ProgressFn) -> type:
    """A tqdm class that reports (bytes done, bytes total) to ``progress`` as a download goes."""
    from tqdm.auto import tqdm

    class _Reporting(tqdm):
        # Counted here, not read from tqdm's ``n``: a bar made with disable=True (the hub's quiet mode) keeps
        # no count.
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._bytes_done = int(kwargs.get("initial") or 0)
            self._bytes_total = int(kwargs.get("total") or 0)
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            self._bytes_done += int(n or 0)
            progress(self._bytes_done, max(self._bytes_total, int(self.total or 0), self._bytes_done))
            return shown

    return _Reporting


def hf_download(repo: str, filename: str, folder: Path, progress: ProgressFn | None) -> Path:
    """One file of a Hugging Face repository into ``folder`` (plain files, no cache links)."""
    from huggingface_hub import hf_hub_download

    kwargs: dict[str, Any] = {"local_dir": str(folder)}
    if progress is not None and "tqdm_class" in inspect.signature(hf_hub_download).parameters:
        kwargs["tqdm_class"] = _progress_tqdm(progress)
    try:
        return Path(hf_hub_download(repo, filename, **kwargs))
    except Exception as exc:  # noqa: BLE001 - network and hub errors have many types; all mean "not now"
        raise UserError(
            f"Downloading {filename} of {repo} failed ({type(exc).__name__}: {exc}); check the "
            f"internet connection, or put the file in {folder} yourself."
        ) from None
