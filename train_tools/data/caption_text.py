"""Caption text: reading a caption file, composing the final caption (uploaded and automatic caption, caption
mode, trigger word), and the hand edits that replace it (``read_caption_edits``, ``edited_caption``,
``apply_tag_rules``).

The rules only: ``prepare_folder`` composes each prepared caption with them, ``items.load_items`` applies the
hand edits when it reads the prepared set, and ``captions.py`` writes the edits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import fileio
from ..config import CAPTION_MODES
from ..errors import UserError
from .layout import EDITS_NAME

log = logging.getLogger(__name__)


def read_text(path: Path) -> str:
    """A caption file as one line: UTF-8 (with or without BOM), UTF-16 with BOM, else Latin-1."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = data.decode("utf-16")
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            log.warning("%s is not UTF-8; reading it as Latin-1", path.name)
            text = data.decode("latin-1")
    lines = [line.strip().strip(",").strip() for line in text.splitlines()]
    return ", ".join(line for line in lines if line)


def _join(*parts: str) -> str:
    return ", ".join(p.strip() for p in parts if p and p.strip())


def compose_caption(uploaded: str | None, automatic: str, mode: str, trigger_word: str = "") -> str:
    """The final caption: the uploaded one used, ignored, or put before/after the automatic one, per ``mode``;
    then the trigger word first (moved there if it is one of the tags, never written twice)."""
    if mode not in CAPTION_MODES:
        raise UserError(f"Caption mode must be one of {', '.join(CAPTION_MODES)}; got '{mode}'.")
    if not uploaded or mode == "ignore":
        base = automatic
    elif mode == "use":
        base = uploaded
    elif mode == "prepend":
        base = _join(uploaded, automatic)
    else:
        base = _join(automatic, uploaded)
    return with_trigger_word(base.strip(), trigger_word)


def with_trigger_word(caption: str, trigger_word: str) -> str:
    trigger = trigger_word.strip()
    if not trigger:
        return caption
    if caption == trigger or (caption.startswith(trigger) and caption[len(trigger)] in " ,"):
        return caption
    tags = [t.strip() for t in caption.split(",")]
    rest = [t for t in tags if t and t != trigger]
    return _join(trigger, *rest)


def split_tags(caption: str) -> list[str]:
    """The comma-separated tags of a caption, each with its inner white space collapsed; empty ones dropped."""
    return [" ".join(t.split()) for t in caption.split(",") if t.strip()]


def read_caption_edits(prepared: Path) -> dict[str, Any]:
    """The hand edits of a prepared folder: ``captions`` maps a stem to ``{"text", "sha256"}`` (the caption
    that replaces the composed one, and the hash of the original it was written for) and ``tag_rules`` lists
    the dataset-wide ``remove`` / ``rename`` operations, which also apply to pictures added later."""
    path = Path(prepared) / EDITS_NAME
    try:
        data = fileio.read_json(path, "ignoring the edits", what="The caption edits file")
    except FileNotFoundError:
        data = {}
    except UserError as exc:
        log.warning("%s", exc)
        data = {}
    data = data if isinstance(data, dict) else {}
    captions = data.get("captions")
    rules = data.get("tag_rules")
    return {
        "format": 1,
        "captions": captions if isinstance(captions, dict) else {},
        "tag_rules": [r for r in rules if isinstance(r, dict)] if isinstance(rules, list) else [],
    }


def edited_caption(edits: dict[str, Any], stem: str, sha256: str | None) -> str | None:
    """The hand-edited caption of ``stem``, or None; an edit made for another picture of the same name (the
    original was replaced since) no longer counts."""
    record = edits.get("captions", {}).get(stem)
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        return None
    made_for = record.get("sha256")
    if made_for and sha256 and made_for != sha256:
        return None
    return str(record["text"])


def apply_tag_rules(caption: str, rules: Sequence[dict[str, Any]]) -> str:
    """``caption`` after the dataset's tag rules, in order; returned unchanged when no rule touches it."""
    tags = split_tags(caption)
    changed = False
    for rule in rules:
        op = rule.get("op")
        if op == "remove" and rule.get("tag") in tags:
            tags = [t for t in tags if t != rule.get("tag")]
            changed = True
        elif op == "rename" and rule.get("old") in tags and isinstance(rule.get("new"), str):
            tags = rename_in_tags(tags, str(rule["old"]), str(rule["new"]))
            changed = True
    return ", ".join(tags) if changed else caption


def rename_in_tags(tags: Sequence[str], old: str, new: str) -> list[str]:
    """``tags`` with ``old`` replaced by ``new``, which is then kept only at its first place."""
    out: list[str] = []
    for tag in tags:
        tag = new if tag == old else tag
        if tag == new and new in out:
            continue
        out.append(tag)
    return out
