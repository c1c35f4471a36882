"""Uploads: what a File component hands over in each Gradio, staged under the user's own file names (so
images and their .txt captions pair by name) and handed to the dataset code.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import fileio
from ..errors import UserError


def uploaded_files(value: Any) -> list[tuple[Path, str]]:
    """(path on disk, the name the user's file had) for what a File component hands over in any Gradio.

    Gradio 3 gives temp-file objects (``.name``, ``.orig_name``), Gradio 4+ gives paths (or dicts in some
    paths through the API).
    """
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    out: list[tuple[Path, str]] = []
    for item in items:
        if isinstance(item, (str, Path)):
            path, orig = Path(item), Path(item).name
        elif isinstance(item, dict):
            raw = item.get("path") or item.get("name")
            if not raw:
                continue
            path, orig = Path(raw), item.get("orig_name") or Path(raw).name
        else:
            raw = getattr(item, "name", None) or getattr(item, "path", None)
            if not raw:
                continue
            path, orig = Path(raw), getattr(item, "orig_name", None) or Path(raw).name
        out.append((path, Path(str(orig)).name))
    return out


def add_uploaded(named: list[tuple[Path, str]], add: Callable[[list[Path]], str]) -> tuple[str, str]:
    """Stage uploaded files under their own names and ``add`` them; (summary, message kind)."""
    refused: list[str] = []
    with tempfile.TemporaryDirectory(prefix="train_tools_upload_") as tmp:
        paths = stage_with_original_names(named, Path(tmp), refused)
        summary = add(paths) if paths else "Nothing added."
    if refused:
        summary += f" Refused {len(refused)} file name(s): " + "; ".join(refused)
    return summary, "warn" if refused else "ok"


def stage_with_original_names(
    files: list[tuple[Path, str]], folder: Path, refused: list[str] | None = None
) -> list[Path]:
    """Paths whose names are the user's own (images and .txt captions pair by name); copies only if needed.

    A name that cannot be stored (too long for the disk, a NUL, ``..``) is left out, with its reason added to
    ``refused``: one bad name never refuses the other pictures of an upload.
    """
    out = []
    for path, orig in files:
        if path.name == orig:
            out.append(path)
            continue
        try:
            target = folder / orig
            fileio.write_with(target, functools.partial(shutil.copyfile, path))
        except (UserError, ValueError) as exc:
            shown = orig if len(orig) <= 40 else orig[:37] + "..."
            (refused if refused is not None else []).append(f"{shown!r}: {exc}")
            continue
        out.append(target)
    return out
