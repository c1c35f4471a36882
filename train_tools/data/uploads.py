"""Adding uploads: ``add_originals`` copies pictures and their same-name captions (files or whole folders) into
a version's ``dataset/`` (or its class pictures' ``reg/``), never overwriting what is there.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from .. import fileio
from ..errors import UserError
from .layout import AUTO_CAPTION_SUFFIX, CAPTION_SUFFIX, IMAGE_SUFFIXES, file_key, nfc
from .reports import AddReport, Refusal

log = logging.getLogger(__name__)


def _walk(paths: Sequence[Path], report: AddReport) -> list[Path]:
    """The files given, folders expanded (recursively, sorted); hidden and system files are left out."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
                out.extend(Path(root) / f for f in sorted(files) if not f.startswith("."))
        elif path.is_file():
            out.append(path)
        else:
            report.refused.append(Refusal(path.name, "not found"))
    return out


def _caption_parts(name: str) -> tuple[str, str] | None:
    """(picture stem, caption suffix) of a caption file name, or None when it is no caption."""
    lower = name.lower()
    if lower.endswith(AUTO_CAPTION_SUFFIX):
        return name[: -len(AUTO_CAPTION_SUFFIX)], AUTO_CAPTION_SUFFIX
    if lower.endswith(CAPTION_SUFFIX):
        return name[: -len(CAPTION_SUFFIX)], CAPTION_SUFFIX
    return None


def _copy(source: Path, target: Path) -> None:
    fileio.write_with(target, lambda tmp: shutil.copyfile(source, tmp))


def add_originals(paths: Sequence[Path], originals: Path) -> AddReport:
    """Copy pictures and their same-name ``.txt`` captions (files or whole folders) into ``originals``.

    Never overwrites: a different picture with a name already taken is renamed ``<stem>-1`` (and its caption
    follows it); an exact copy of a picture already there is skipped. A caption that would replace a
    different existing caption is refused, so an edited caption is never lost.
    """
    originals = Path(originals)
    fileio.check_writable(originals)  # a read-only folder: one sentence, not one refusal per picture
    report = AddReport()
    files = _walk(paths, report)
    existing = [p for p in originals.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    hashes = {fileio.sha256_file(p): p.name for p in existing}
    used_stems = {file_key(p.stem) for p in existing}
    final_stem: dict[tuple[Path, str], str] = {}
    captions: list[Path] = []
    for path in files:
        name = nfc(path.name)
        try:
            if _caption_parts(name) is not None:
                captions.append(path)
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                _add_image(path, originals, report, hashes, used_stems, final_stem)
            else:
                report.refused.append(Refusal(name, "not a picture or a .txt caption"))
        except UserError as exc:  # a name that cannot be stored (too long, ...): that file only, not the batch
            report.refused.append(Refusal(name, str(exc)))
    for path in captions:
        try:
            _add_caption(path, originals, report, final_stem)
        except UserError as exc:
            report.refused.append(Refusal(nfc(path.name), str(exc)))
    log.debug("%s", report.summary())  # the caller shows the summary (the CLI prints it, the tab displays it)
    return report


def _add_image(
    path: Path,
    originals: Path,
    report: AddReport,
    hashes: dict[str, str],
    used_stems: set[str],
    final_stem: dict[tuple[Path, str], str],
) -> None:
    name = nfc(path.name)
    try:
        sha = fileio.sha256_file(path)
    except OSError as exc:
        report.refused.append(Refusal(name, f"could not be read ({exc})"))
        return
    if sha in hashes:
        report.skipped.append(name)
        final_stem[(path.parent, file_key(path.stem))] = Path(hashes[sha]).stem
        return
    stem, suffix = nfc(path.stem), path.suffix
    candidate, n = stem, 1
    while file_key(candidate) in used_stems or (originals / f"{candidate}{suffix}").exists():
        candidate = f"{stem}-{n}"
        n += 1
    target = originals / f"{candidate}{suffix}"
    _copy(path, target)
    if candidate != stem:
        report.renamed.append((name, target.name))
    report.added.append(target)
    hashes[sha] = target.name
    used_stems.add(file_key(candidate))
    final_stem[(path.parent, file_key(path.stem))] = candidate


def _add_caption(path: Path, originals: Path, report: AddReport, final_stem: dict[tuple[Path, str], str]) -> None:
    name = nfc(path.name)
    parts = _caption_parts(name)
    assert parts is not None
    stem, suffix = parts
    target = originals / f"{final_stem.get((path.parent, file_key(stem)), stem)}{suffix}"
    try:
        if target.exists():
            if fileio.sha256_file(target) == fileio.sha256_file(path):
                report.skipped.append(name)
            else:
                report.refused.append(
                    Refusal(
                        name,
                        f"a different caption {target.name} is already there; edit "
                        "it in the tab, or delete it first to replace it",
                    )
                )
            return
        _copy(path, target)
    except OSError as exc:
        report.refused.append(Refusal(name, f"could not be copied ({exc})"))
        return
    report.added.append(target)
