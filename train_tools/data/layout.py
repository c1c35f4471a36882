"""The file layout of a dataset's folders: which files are pictures and captions, the names of the prepared
folder's own files, how file names are compared, and reading the prepared folder's manifest.

``prepare_folder.prepare_dataset`` writes the manifest (``.manifest.json``: what each prepared file was made
from); ``captions.py`` writes the hand edits (``.caption_edits.json``); ``items.load_items`` reads both.
"""

from __future__ import annotations

import logging
import unicodedata
from pathlib import Path
from typing import Any

from .. import fileio
from ..errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".dib", ".gif", ".tif", ".tiff")
CAPTION_SUFFIX = ".txt"
AUTO_CAPTION_SUFFIX = ".auto.txt"
MANIFEST_NAME = ".manifest.json"
# A picture's loss mask beside it in dataset/ (``cat.png`` and ``cat.mask.png``: white = trained), and where the
# prepared masks go (``prepared/.masks/<stem>.png``, the bucket's size, like the picture).
MASK_SUFFIX = ".mask.png"
MASKS_FOLDER = ".masks"


def masked_view_path(mask: Path) -> Path:
    """Where the gallery's view of a masked picture lies for its prepared mask: ``prepared/masked/<stem>.png``
    (not in a hidden folder: the web page loads it, and Gradio serves no hidden folder)."""
    return mask.parent.parent / "masked" / mask.name


# Hand edits of prepared captions (captions.py writes it). A file of its own, because prepare_dataset rewrites
# the manifest and the .txt captions; its leading dot keeps remove_stale away from it.
EDITS_NAME = ".caption_edits.json"


def nfc(text: str) -> str:
    """``text`` in Unicode NFC (macOS hands out decomposed file names)."""
    return unicodedata.normalize("NFC", text)


def file_key(text: str) -> str:
    """File names compared as a case-insensitive file system (Windows, macOS) would."""
    return nfc(text).casefold()


def read_manifest(prepared: Path) -> dict[str, Any]:
    """The prepared folder's manifest; empty when it is missing or damaged (then everything is prepared again)."""
    path = prepared / MANIFEST_NAME
    try:
        data = fileio.read_json(path, "preparing everything again", what="The prepared-dataset manifest")
    except FileNotFoundError:
        return {}
    except UserError as exc:
        log.warning("%s", exc)
        return {}
    return data if isinstance(data, dict) else {}


def original_hashes(prepared: Path) -> dict[str, str]:
    """Prepared stem -> sha256 of the original it was made from, as the manifest records them."""
    items = read_manifest(Path(prepared)).get("items", {})
    return {
        str(e["stem"]): str(e["sha256"])
        for e in items.values()
        if isinstance(e, dict) and e.get("stem") and e.get("sha256")
    }
