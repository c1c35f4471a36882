"""Preparing one folder: ``prepare_dataset`` turns the originals (``dataset/``, or a version's class pictures)
into training items in ``prepared/``.

Every original becomes one lossless PNG of its aspect-ratio bucket plus one ``.txt`` caption; the originals are
never touched, bad files are refused one by one with a reason, and only what changed is redone (a manifest in
``prepared/`` remembers what each prepared file was made from). ``items.load_items`` reads the result.

Prepared images are PNG because they are encoded once and read many times: a lossy format would add its
artefacts to what the LoRA learns, and the disk cost of a few dozen PNGs is small.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .. import fileio
from ..errors import UserError
from .buckets import choose_bucket, fit_to_bucket
from .caption_text import apply_tag_rules, compose_caption, edited_caption, read_caption_edits, read_text
from .layout import (
    AUTO_CAPTION_SUFFIX,
    CAPTION_SUFFIX,
    IMAGE_SUFFIXES,
    MANIFEST_NAME,
    MASK_SUFFIX,
    MASKS_FOLDER,
    file_key,
    masked_view_path,
    nfc,
    read_manifest,
)
from .pictures import Refused, load_mask, load_original, pixel_hash
from .prepare_options import PrepareOptions
from .reports import PrepareReport, Refusal

log = logging.getLogger(__name__)


@dataclass
class _Source:
    name: str
    path: Path
    stem: str
    caption: Path | None
    auto: Path | None
    mask: Path | None = None  # ``<name>.mask.png`` beside it: the masked loss's mask (else its alpha, if any)


def _scan_originals(originals: Path, report: PrepareReport) -> list[_Source]:
    """The pictures in ``originals`` (sorted), each with its caption files and a unique prepared stem."""
    if not originals.is_dir():
        return []
    files = sorted(
        (p for p in originals.iterdir() if p.is_file() and not p.name.startswith(".")), key=lambda p: nfc(p.name)
    )
    texts = {file_key(p.name): p for p in files if p.name.lower().endswith(CAPTION_SUFFIX)}
    masks = {file_key(p.name[: -len(MASK_SUFFIX)]): p for p in files if p.name.lower().endswith(MASK_SUFFIX)}
    sources: list[_Source] = []
    used: set[str] = set()
    for path in files:
        suffix = path.suffix.lower()
        if suffix == CAPTION_SUFFIX or path.name.lower().endswith(MASK_SUFFIX):
            continue
        if suffix not in IMAGE_SUFFIXES:
            report.refused.append(
                Refusal(
                    path.name,
                    f"not a picture ({path.suffix or 'no'} files are not used; add JPEG, PNG, WebP, BMP, GIF or TIFF)",
                )
            )
            continue
        stem = nfc(path.stem)
        unique = stem
        n = 1
        while file_key(unique) in used:
            unique = f"{stem}_{suffix[1:]}" if n == 1 else f"{stem}_{suffix[1:]}{n}"
            n += 1
        used.add(file_key(unique))
        sources.append(
            _Source(
                path.name,
                path,
                unique,
                texts.get(file_key(stem + CAPTION_SUFFIX)),
                texts.get(file_key(stem + AUTO_CAPTION_SUFFIX)),
                masks.get(file_key(stem)),
            )
        )
    return sources


def _file_hash(path: Path | None) -> str | None:
    return fileio.sha256_file(path) if path is not None else None


#: Where the captioners lived when folders were first prepared (one flat package): their manifests cache the
#: captions under that module name, so it stays the name of the id and those captions stay cached.
_CAPTIONER_ID_MODULES = {
    "train_tools.data.wd14": "train_tools.captioners",
    "train_tools.data.blip": "train_tools.captioners",
}


def _captioner_id(auto_caption: Callable[[Image.Image], str] | None) -> str | None:
    if auto_caption is None:
        return None
    module = getattr(auto_caption, "__module__", "")
    module = _CAPTIONER_ID_MODULES.get(module, module)
    return f"{module}.{getattr(auto_caption, '__qualname__', repr(auto_caption))}"


class _Preparer:
    """One ``prepare_dataset`` call; its state is the old manifest, the new one, and the report."""

    def __init__(
        self, prepared: Path, options: PrepareOptions, auto_caption: Callable[[Image.Image], str] | None
    ) -> None:
        self.prepared = prepared
        self.options = options
        self.auto_caption = auto_caption
        self.captioner = _captioner_id(auto_caption)
        self.report = PrepareReport()
        old = read_manifest(prepared)
        same_images = old.get("image_options") == options.image_signature()
        self.old_items: dict[str, dict[str, Any]] = old.get("items", {}) if same_images else {}
        self.old_refused: dict[str, dict[str, Any]] = old.get("refused", {}) if same_images else {}
        self.items: dict[str, dict[str, Any]] = {}
        self.refused: dict[str, dict[str, Any]] = {}
        self.by_sha: dict[str, str] = {}
        self.by_pixels: dict[str, str] = {}
        self.edits = read_caption_edits(prepared)

    def manifest(self) -> dict[str, Any]:
        return {
            "format": 1,
            "image_options": self.options.image_signature(),
            "caption_options": {"caption_mode": self.options.caption_mode, "trigger_word": self.options.trigger_word},
            "flip_aug": self.options.flip_aug,
            "items": self.items,
            "refused": self.refused,
        }

    def refuse(self, source: _Source, sha: str | None, reason: str) -> None:
        self.report.refused.append(Refusal(source.name, reason))
        if sha is not None:
            self.refused[source.name] = {"sha256": sha, "reason": reason}

    def process(self, source: _Source) -> None:
        try:
            sha = fileio.sha256_file(source.path)
        except OSError as exc:
            self.refuse(source, None, f"the file could not be read ({exc})")
            return
        if sha in self.by_sha:
            self.report.duplicates.append((source.name, self.by_sha[sha]))
            return
        self.by_sha[sha] = source.name
        cached_refusal = self.old_refused.get(source.name)
        if cached_refusal and cached_refusal.get("sha256") == sha:
            self.refuse(source, sha, str(cached_refusal["reason"]))
            return
        mask_sha = fileio.sha256_file(source.mask) if source.mask is not None else None
        entry = self._reusable_entry(source, sha, mask_sha)
        image: Image.Image | None = None
        if entry is None:
            try:
                upright_image, upright_size, alpha = load_original(source.path, self.options)
                mask = self._mask(source, alpha, upright_size)
            except Refused as exc:
                self.refuse(source, sha, str(exc))
                return
            entry = {
                "sha256": sha,
                "stem": source.stem,
                "pixels": pixel_hash(upright_image),
                "source_size": list(upright_size),
                "mask": mask_sha or ("alpha" if mask is not None else None),
            }
            if self._is_duplicate(source, entry):
                return
            image = self._write_image(upright_image, upright_size, entry, mask)
        elif self._is_duplicate(source, entry):
            return
        self.by_pixels[entry["pixels"]] = source.name
        self._write_caption(source, entry, image)
        self.items[source.name] = entry

    def _reusable_entry(self, source: _Source, sha: str, mask_sha: str | None) -> dict[str, Any] | None:
        old = self.old_items.get(source.name)
        if not old or old.get("sha256") != sha or old.get("stem") != source.stem:
            return None
        if not (self.prepared / f"{source.stem}.png").is_file():
            return None
        # A mask file is known by its hash; an alpha mask comes with the picture (same hash, same alpha).
        wanted = mask_sha or ("alpha" if old.get("mask") == "alpha" else None)
        if old.get("mask") != wanted:
            return None  # a mask file added, changed or removed
        mask_path = self.prepared / MASKS_FOLDER / f"{source.stem}.png"
        if old.get("mask") and not (mask_path.is_file() and masked_view_path(mask_path).is_file()):
            return None
        return dict(old)

    def _mask(self, source: _Source, alpha: Image.Image | None, upright_size: tuple[int, int]) -> Image.Image | None:
        """The picture's loss mask upright (``L``, 255 = trained): its mask file, stretched to the picture's
        size, else its alpha channel, else None."""
        if source.mask is None:
            return alpha
        mask = load_mask(source.mask, self.options)
        return mask if mask.size == upright_size else mask.resize(upright_size, Image.Resampling.BILINEAR)

    def _is_duplicate(self, source: _Source, entry: dict[str, Any]) -> bool:
        kept = self.by_pixels.get(entry["pixels"])
        if kept is None:
            return False
        self.report.duplicates.append((source.name, kept))
        return True

    def _write_image(
        self, image: Image.Image, upright_size: tuple[int, int], entry: dict[str, Any], mask: Image.Image | None
    ) -> Image.Image:
        bucket = choose_bucket(upright_size[0], upright_size[1], self.options)
        fitted = fit_to_bucket(image, bucket)
        fileio.write_with(
            self.prepared / f"{entry['stem']}.png", lambda tmp: fitted.save(tmp, format="PNG", compress_level=6)
        )
        mask_path = self.prepared / MASKS_FOLDER / f"{entry['stem']}.png"
        shown_path = masked_view_path(mask_path)
        if mask is not None:  # cropped and scaled exactly as the picture
            fitted_mask = fit_to_bucket(mask, bucket)
            mask_path.parent.mkdir(exist_ok=True)
            shown_path.parent.mkdir(exist_ok=True)
            fileio.write_with(mask_path, lambda tmp: fitted_mask.save(tmp, format="PNG"))
            # What the gallery shows: the picture with what the loss leaves out dimmed.
            dimmed = Image.blend(fitted, Image.new("RGB", fitted.size, (0, 0, 0)), 0.75)
            shown = Image.composite(fitted, dimmed, fitted_mask)
            fileio.write_with(shown_path, lambda tmp: shown.save(tmp, format="PNG"))
        else:
            mask_path.unlink(missing_ok=True)
            shown_path.unlink(missing_ok=True)
        entry["size"] = list(bucket)
        entry.pop("caption", None)
        entry.pop("auto", None)
        self.report.encoded += 1
        return fitted

    def _automatic_caption(self, source: _Source, entry: dict[str, Any], image: Image.Image | None) -> str:
        if source.auto is not None:
            return read_text(source.auto)
        if self.auto_caption is None:
            return ""
        cached = entry.get("auto")
        if isinstance(cached, dict) and cached.get("by") == self.captioner:
            return str(cached.get("text", ""))
        if image is None:
            with Image.open(self.prepared / f"{entry['stem']}.png") as im:
                image = im.convert("RGB")
        text = " ".join(str(self.auto_caption(image) or "").split())
        entry["auto"] = {"by": self.captioner, "text": text}
        return text

    def _write_caption(self, source: _Source, entry: dict[str, Any], image: Image.Image | None) -> None:
        uploaded = read_text(source.caption) if source.caption is not None else None
        needs_auto = self.options.caption_mode != "use" or not uploaded
        automatic = self._automatic_caption(source, entry, image) if needs_auto else ""
        caption = compose_caption(uploaded, automatic, self.options.caption_mode, self.options.trigger_word)
        edited = edited_caption(self.edits, entry["stem"], entry.get("sha256"))
        caption = edited if edited is not None else apply_tag_rules(caption, self.edits["tag_rules"])
        target = self.prepared / f"{entry['stem']}.txt"
        if entry.get("caption") != caption or not target.is_file():
            fileio.write_text(target, caption + "\n")
            self.report.captions_written += 1
        entry["caption"] = caption

    def remove_stale(self) -> None:
        """Delete prepared files that belong to no current original (removed, refused or duplicate ones)."""
        keep = {file_key(entry["stem"]) for entry in self.items.values()}
        masks = self.prepared / MASKS_FOLDER
        masked = {file_key(entry["stem"]) for entry in self.items.values() if entry.get("mask")}
        for path in masks.glob("*.png") if masks.is_dir() else []:
            if file_key(path.stem) not in masked:
                path.unlink(missing_ok=True)
                masked_view_path(path).unlink(missing_ok=True)
        for path in self.prepared.iterdir():
            if not path.is_file():
                continue
            is_temp = path.name.startswith(".") and path.name.endswith(".tmp")
            ours = path.suffix.lower() in (".png", CAPTION_SUFFIX) and not path.name.startswith(".")
            if is_temp or (ours and file_key(path.stem) not in keep):
                path.unlink(missing_ok=True)
                self.report.removed += 0 if is_temp else int(path.suffix.lower() == ".png")


def prepare_dataset(
    originals: Path,
    prepared: Path,
    options: PrepareOptions,
    progress: Callable[[int, int], None] | None = None,
    *,
    auto_caption: Callable[[Image.Image], str] | None = None,
) -> PrepareReport:
    """Bring ``prepared/`` up to date with ``originals/``: one bucket-sized PNG and one caption per picture.

    Only what changed is redone: a manifest remembers each original's hash and the options it was made with;
    a changed image option redoes every image, a changed caption option or caption file rewrites captions
    only. ``auto_caption`` (optional) captions a prepared picture for the caption modes that use an automatic
    caption; a ``<stem>.auto.txt`` beside an original takes its place. Files that cannot be used are listed in
    the report with a reason; the originals are only read.
    """
    options.validate()
    originals, prepared = Path(originals), Path(prepared)
    prepared.mkdir(parents=True, exist_ok=True)
    job = _Preparer(prepared, options, auto_caption)
    sources = _scan_originals(originals, job.report)
    for done, source in enumerate(sources, start=1):
        try:
            job.process(source)
        except UserError:
            raise  # the disk is full: nothing later can succeed either
        except Exception as exc:  # noqa: BLE001 - one picture's unexpected failure must not stop the batch
            log.exception("Preparing %s failed", source.name)
            job.refuse(source, None, f"preparing it failed ({type(exc).__name__}: {exc})")
        if progress is not None:
            progress(done, len(sources))
    job.remove_stale()
    fileio.write_json(prepared / MANIFEST_NAME, job.manifest())
    job.report.prepared = len(job.items)
    log.info("Prepared dataset: %s", job.report.summary())
    return job.report
