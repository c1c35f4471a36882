"""The prepared set as the trainer reads it: ``DatasetItem`` (one prepared picture, its bucket size and its
caption) and ``load_items``, plus what the trainer derives from the items (their pixels as a tensor, the
repeats per epoch, the tag frequency in the LoRA's metadata).

The trainer batches the items with ``sampler.BucketBatchSampler`` so that each batch holds pictures of one size
(``buckets.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from .caption_text import edited_caption, read_caption_edits, read_text
from .layout import CAPTION_SUFFIX, MASKS_FOLDER, nfc, read_manifest

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class DatasetItem:
    """One training picture: a prepared image of its bucket's exact size and the caption the trainer reads."""

    image: Path
    caption: str
    size: tuple[int, int]
    source: str = ""
    flipped: bool = False
    source_size: tuple[int, int] | None = None
    mask: Path | None = None  # the prepared loss mask (masked_loss), the picture's size

    @property
    def name(self) -> str:
        return self.image.stem


def load_items(prepared: Path, *, flip: bool = False) -> list[DatasetItem]:
    """The items of a prepared folder (the version's ``prepared/``, or a regularisation folder), sorted by name.

    Each ``<stem>.png`` with its ``<stem>.txt`` (an empty caption when missing), or its hand-edited caption
    when there is one (see ``read_caption_edits``). ``flip=True`` adds a mirrored
    copy of each item (``flipped=True``); the trainer does not ask for it, as it caches mirrored latents itself
    when ``flip_aug`` is on.
    """
    prepared = Path(prepared)
    if not prepared.is_dir():
        return []
    info = {entry.get("stem"): (name, entry) for name, entry in read_manifest(prepared).get("items", {}).items()}
    edits = read_caption_edits(prepared)
    items: list[DatasetItem] = []
    for path in sorted(prepared.glob("*.png"), key=lambda p: nfc(p.name)):
        if path.name.startswith("."):
            continue
        try:
            with Image.open(path) as im:
                size = im.size
        except (OSError, ValueError) as exc:
            log.warning("Skipping unreadable prepared image %s: %s", path.name, exc)
            continue
        caption_path = path.with_suffix(CAPTION_SUFFIX)
        caption = read_text(caption_path) if caption_path.is_file() else ""
        source, entry = info.get(path.stem, ("", {}))
        edited = edited_caption(edits, path.stem, entry.get("sha256"))
        caption = edited if edited is not None else caption
        source_size = entry.get("source_size")
        item = DatasetItem(
            image=path,
            caption=caption,
            size=(int(size[0]), int(size[1])),
            source=source or "",
            source_size=tuple(source_size) if source_size else None,
            mask=mask if (mask := prepared / MASKS_FOLDER / path.name).is_file() else None,
        )
        items.append(item)
        if flip:
            items.append(dataclasses.replace(item, flipped=True))
    return items


def open_prepared(item: DatasetItem) -> Image.Image:
    """The item's picture in RGB, mirrored when the item is a flipped copy."""
    with Image.open(item.image) as im:
        image = im.convert("RGB")
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if item.flipped else image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL picture as a CHW float tensor in [-1, 1], what the VAE encoder takes."""
    import numpy as np
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def auto_repeats(n: int) -> int:
    """Repeats per epoch when the setting is 0: ``max(4, 512 // n)``, so small sets still see ~512 images;
    4 for an empty set (nothing to train, but a sensible number to show)."""
    if n <= 0:
        return 4
    return max(4, 512 // n)


def tag_frequency(items: Sequence[DatasetItem]) -> dict[str, int]:
    """How often each comma-separated tag occurs (kohya's ``ss_tag_frequency`` inner dict); flipped copies are
    the same pictures and are not counted again."""
    counts: Counter[str] = Counter()
    for item in items:
        if item.flipped:
            continue
        counts.update(t.strip() for t in item.caption.split(",") if t.strip())
    return dict(counts)
