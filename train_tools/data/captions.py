"""Editing the captions of a prepared dataset: one picture's caption, or one tag across all of them.

``prepare_dataset`` rewrites a prepared ``.txt`` whenever what it is composed from changes (an uploaded
caption, the caption mode, the trigger word, a re-encoded picture), so an edit written only into that file
would be lost. Edits are therefore kept in ``prepared/.caption_edits.json`` (``layout.EDITS_NAME``):

- a picture's own edit replaces its composed caption for as long as its original is the same file;
- removing or renaming a tag edits every caption now *and* is remembered as a rule, so pictures captioned
  later (new uploads, a new automatic captioner) get the same treatment.

The prepared ``.txt`` is rewritten at once too, and ``load_items`` prefers the edits file, so training and
``ss_tag_frequency`` (``tag_frequency(load_items(...))``) see an edit immediately.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from .. import fileio
from ..errors import UserError
from .caption_text import apply_tag_rules, edited_caption, read_caption_edits, read_text
from .items import DatasetItem, load_items, tag_frequency
from .layout import CAPTION_SUFFIX, EDITS_NAME, original_hashes

log = logging.getLogger(__name__)

# One read-modify-write of the edits file at a time (the tab runs events on several threads).
_LOCK = threading.RLock()


def clean_caption(text: str | None) -> str:
    """A caption as the trainer reads it: lines joined by ", ", white space collapsed."""
    lines = [" ".join(line.split()).strip(",").strip() for line in (text or "").splitlines()]
    return ", ".join(line for line in lines if line)


def read_caption(item: DatasetItem) -> str:
    """The item's caption as it is now on disk (an edit made after ``load_items`` included)."""
    prepared = item.image.parent
    sha = original_hashes(prepared).get(item.image.stem)
    edited = edited_caption(read_caption_edits(prepared), item.image.stem, sha)
    if edited is not None:
        return edited
    txt = item.image.with_suffix(CAPTION_SUFFIX)
    return read_text(txt) if txt.is_file() else ""


def write_caption(prepared: Path, image_name: str, text: str) -> str:
    """Replace the caption of the prepared picture ``image_name`` (``a.png`` or ``a``); returns it cleaned.

    The edit survives later Update Dataset runs until the original picture itself is replaced.
    """
    prepared = Path(prepared)
    stem = _stem_of(prepared, image_name)
    caption = clean_caption(text)
    with _LOCK:
        edits = read_caption_edits(prepared)
        edits["captions"][stem] = {"text": caption, "sha256": original_hashes(prepared).get(stem)}
        fileio.write_json(prepared / EDITS_NAME, edits)
        fileio.write_text(prepared / f"{stem}{CAPTION_SUFFIX}", caption + "\n")
    log.info("Caption of %s edited.", stem)
    return caption


def tag_counts(prepared: Path) -> list[tuple[str, int]]:
    """Every tag of the prepared captions with the number of pictures it appears in, most frequent first."""
    counts = tag_frequency(load_items(Path(prepared)))
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def remove_tag(prepared: Path, tag: str) -> int:
    """Remove ``tag`` from every caption (and from pictures captioned later); returns the captions changed."""
    tag = _require_tag(tag, "remove")
    return _apply_rule(Path(prepared), {"op": "remove", "tag": tag})


def rename_tag(prepared: Path, old: str, new: str) -> int:
    """Rename ``old`` to ``new`` in every caption (and in pictures captioned later); returns the captions
    changed. Where ``new`` was already there, it is kept once, at its first place."""
    old = _require_tag(old, "rename")
    new = _require_tag(new, "rename it to")
    if old == new:
        return 0
    return _apply_rule(Path(prepared), {"op": "rename", "old": old, "new": new})


# ---------------------------------------------------------------------- helpers


def _require_tag(tag: str | None, verb: str) -> str:
    cleaned = " ".join((tag or "").split()).strip(",").strip()
    if not cleaned:
        raise UserError(f"Type the tag to {verb} (one tag, without commas).")
    if "," in cleaned:
        raise UserError(f"'{cleaned}' holds a comma: give one tag at a time.")
    return cleaned


def _stem_of(prepared: Path, image_name: str) -> str:
    name = Path(str(image_name or "")).name
    stem = name[: -len(".png")] if name.lower().endswith(".png") else name
    if not stem or not (prepared / f"{stem}.png").is_file():
        raise UserError(
            f"'{name}' is not a prepared picture of this version; press Update Dataset, then click the picture again."
        )
    return stem


def _apply_rule(prepared: Path, rule: dict[str, Any]) -> int:
    """Apply one tag rule to every current caption and remember it for later ones."""
    changed = 0
    with _LOCK:
        edits = read_caption_edits(prepared)
        hashes = original_hashes(prepared)
        for item in load_items(prepared):
            new_caption = apply_tag_rules(item.caption, [rule])
            if new_caption == item.caption:
                continue
            stem = item.image.stem
            if edited_caption(edits, stem, hashes.get(stem)) is not None:
                edits["captions"][stem]["text"] = new_caption
            fileio.write_text(item.image.with_suffix(CAPTION_SUFFIX), new_caption + "\n")
            changed += 1
        edits["tag_rules"].append(rule)
        fileio.write_json(prepared / EDITS_NAME, edits)
    log.info("Tag rule %s changed %d captions.", rule, changed)
    return changed
