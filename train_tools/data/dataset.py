"""The dataset: the user's pictures in ``dataset/`` become training items in ``prepared/``.

``prepare_dataset`` turns every original (any common format, any colour mode, any orientation) into one
lossless PNG of its aspect-ratio bucket plus one ``.txt`` caption; it never touches the originals, refuses bad
files one by one with a reason, and only redoes what changed (a manifest in ``prepared/`` remembers what each
prepared file was made from). The trainer then reads ``load_items`` and batches them with
``sampler.BucketBatchSampler`` so that each batch holds pictures of one size (``buckets.py``).

Prepared images are PNG because they are encoded once and read many times: a lossy format would add its
artefacts to what the LoRA learns, and the disk cost of a few dozen PNGs is small.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import shutil
import threading
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageColor

from .. import fileio
from .buckets import choose_bucket, fit_to_bucket
from ..config import CAPTION_MODES, TrainConfig
from ..errors import UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".dib", ".gif", ".tif", ".tiff")
CAPTION_SUFFIX = ".txt"
AUTO_CAPTION_SUFFIX = ".auto.txt"
MANIFEST_NAME = ".manifest.json"
# Hand edits of prepared captions (captions.py writes it). A file of its own, because prepare_dataset rewrites
# the manifest and the .txt captions; its leading dot keeps remove_stale away from it.
EDITS_NAME = ".caption_edits.json"
# Bump when the way prepared images are made changes, so that every prepared folder is redone once.
PIPELINE_VERSION = 1
_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that shows the picture upright (the EXIF specification's table).
_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_PIXEL_LIMIT_LOCK = threading.Lock()


# ====================================================================== options and results

@dataclass
class PrepareOptions:
    """What decides how prepared images and captions look; defaults equal TrainConfig's."""

    resolution: int = 512
    enable_bucket: bool = True
    min_bucket_reso: int = 320
    max_bucket_reso: int = 960
    bucket_no_upscale: bool = True
    flip_aug: bool = False
    caption_mode: str = "use"
    trigger_word: str = ""
    background_color: str = "#ffffff"
    min_image_size: int = 64
    max_pixels: int = 100_000_000
    bucket_step: int = 64

    @classmethod
    def from_config(cls, config: TrainConfig, trigger_word_default: str = "") -> PrepareOptions:
        """The options of a training config: every field both share comes from the config.

        ``trigger_word_default`` (the project name, say) is used when the config's trigger word is empty.
        """
        shared = {f.name for f in dataclasses.fields(TrainConfig)}
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if f.name in shared}
        options = cls(**values)
        if not options.trigger_word.strip():
            options.trigger_word = trigger_word_default
        return options

    def validate(self) -> None:
        if self.caption_mode not in CAPTION_MODES:
            raise UserError(f"Caption mode must be one of {', '.join(CAPTION_MODES)}; got '{self.caption_mode}'.")
        if self.bucket_step < 8 or self.bucket_step % 8:
            raise UserError(f"The bucket step must be a multiple of 8; got {self.bucket_step}.")
        if self.resolution < self.bucket_step:
            raise UserError(f"The resolution must be at least {self.bucket_step}; got {self.resolution}.")
        if self.min_bucket_reso > self.max_bucket_reso:
            raise UserError("Setting 'min_bucket_reso' must not be larger than 'max_bucket_reso'.")
        if self.min_image_size < 1 or self.max_pixels < 1:
            raise UserError("The minimum image side and the pixel limit must be positive.")
        self.background_rgb()

    def background_rgb(self) -> tuple[int, int, int]:
        try:
            rgb = ImageColor.getrgb(self.background_color)
        except ValueError:
            raise UserError(f"Background colour '{self.background_color}' is not a colour; write it like "
                            "#ffffff.") from None
        return (int(rgb[0]), int(rgb[1]), int(rgb[2]))

    def image_signature(self) -> dict[str, Any]:
        """The options that change the prepared pixels: when one changes, every image is redone."""
        return {
            "pipeline": PIPELINE_VERSION,
            "resolution": self.resolution,
            "enable_bucket": self.enable_bucket,
            "min_bucket_reso": self.min_bucket_reso,
            "max_bucket_reso": self.max_bucket_reso,
            "bucket_no_upscale": self.bucket_no_upscale,
            "bucket_step": self.bucket_step,
            "background": list(self.background_rgb()),
            "min_image_size": self.min_image_size,
            "max_pixels": self.max_pixels,
        }


@dataclass(frozen=True)
class Refusal:
    """A file that was not used, and why."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


@dataclass
class PrepareReport:
    """What ``prepare_dataset`` did. ``prepared`` counts the usable items now in ``prepared/``."""

    prepared: int = 0
    refused: list[Refusal] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    encoded: int = 0
    captions_written: int = 0
    removed: int = 0

    def summary(self) -> str:
        parts = [f"{self.prepared} pictures ready ({self.encoded} newly prepared)"]
        if self.duplicates:
            parts.append(f"{len(self.duplicates)} duplicates skipped: "
                         + ", ".join(f"{dup} (same as {kept})" for dup, kept in self.duplicates[:3]))
        if self.refused:
            parts.append(f"{len(self.refused)} refused: " + "; ".join(str(r) for r in self.refused[:5]))
        return "; ".join(parts) + "."


@dataclass
class AddReport:
    """What ``add_originals`` did."""

    added: list[Path] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        images = sum(1 for p in self.added if p.suffix.lower() in IMAGE_SUFFIXES)
        parts = [f"Added {images} pictures and {len(self.added) - images} captions"]
        if self.renamed:
            parts.append(f"{len(self.renamed)} renamed to keep an existing file of the same name")
        if self.skipped:
            parts.append(f"{len(self.skipped)} exact duplicates skipped")
        if self.refused:
            parts.append(f"{len(self.refused)} refused: " + "; ".join(str(r) for r in self.refused[:5]))
        return "; ".join(parts) + "."


@dataclass
class DatasetItem:
    """One training picture: a prepared image of its bucket's exact size and the caption the trainer reads."""

    image: Path
    caption: str
    size: tuple[int, int]
    source: str = ""
    flipped: bool = False
    source_size: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        return self.image.stem


class _Refused(Exception):
    """Internal: the file cannot be used; the message is the reason shown to the user."""


# ====================================================================== reading one original

@contextmanager
def _pixel_limit(limit: int | None) -> Iterator[None]:
    """Pillow's decompression-bomb limit set to ``limit`` for this block only (a module lock serialises it).

    The global is restored afterwards, so the host application's own limit is left as it was.
    """
    with _PIXEL_LIMIT_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = limit
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _oriented_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def load_original(path: Path, options: PrepareOptions) -> tuple[Image.Image, tuple[int, int]]:
    """The picture upright and in RGB (alpha flattened), and its upright full size; raises ``_Refused``.

    Checks that need only the header (pixel count, smallest side) run before any pixel is decoded. Large
    JPEGs are decoded at a reduced scale that still covers their bucket, which is much faster.
    """
    try:
        if path.stat().st_size == 0:
            raise _Refused("the file is empty (0 bytes)")
        with _pixel_limit(None):
            im = Image.open(path)
        try:
            return _decode(im, options)
        finally:
            im.close()
    except _Refused:
        raise
    except Image.UnidentifiedImageError:
        raise _Refused("not a picture: its contents are not an image format that can be read") from None
    except Image.DecompressionBombError as exc:
        raise _Refused(f"too large to decode safely ({exc})") from None
    except OSError as exc:
        text = str(exc)
        if "truncated" in text or "broken data stream" in text or "end of file" in text.lower():
            raise _Refused("the file is damaged or incomplete (its image data ends early)") from None
        raise _Refused(f"the file could not be read ({text})") from None
    except (SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, ZeroDivisionError) as exc:
        # Pillow's decoders report damaged headers with these.
        raise _Refused(f"the file is damaged ({type(exc).__name__}: {exc})") from None


def _decode(im: Image.Image, options: PrepareOptions) -> tuple[Image.Image, tuple[int, int]]:
    w, h = im.size
    if w * h > options.max_pixels:
        raise _Refused(f"too large: {w}x{h} is {w * h:,} pixels, more than the limit of {options.max_pixels:,} "
                       "(a possible decompression bomb)")
    if min(w, h) < options.min_image_size:
        raise _Refused(f"too small: {w}x{h}; the shorter side must be at least {options.min_image_size} pixels")
    if im.format == "JPEG":
        # A JPEG's EXIF comes before its pixels, so the upright bucket is known before decoding.
        orientation = _orientation(im)
        upright = _oriented_size((w, h), orientation)
        bucket = choose_bucket(upright[0], upright[1], options)
        scale = max(bucket[0] / upright[0], bucket[1] / upright[1])
        need = _oriented_size((math.ceil(upright[0] * scale), math.ceil(upright[1] * scale)), orientation)
        im.draft(im.mode, need)
    with _pixel_limit(options.max_pixels):
        im.seek(0)
        im.load()
    orientation = _orientation(im)  # a PNG may keep its EXIF after the pixel data
    upright = _oriented_size((w, h), orientation)
    rgb = to_rgb(im, options.background_rgb())
    fix = _ORIENTATION_FIX.get(orientation)
    if fix is not None:
        rgb = rgb.transpose(fix)
    return rgb, upright


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except (OSError, ValueError, TypeError, SyntaxError):
        return 1  # a damaged EXIF block: show the picture as stored


def to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode as 8-bit sRGB: high bit depths scaled (not clipped), colour profiles applied,
    transparency (alpha, or a palette/colour key) flattened onto ``background``."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        im = _high_depth_to_l(im)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        im = im.convert("LA").convert("RGBA") if im.mode == "La" else im.convert("RGBA")
        alpha = im.getchannel("A")
        rgb = _to_srgb(im.convert("RGB"), im.info.get("icc_profile"))
        rgb.putalpha(alpha)
        flat = Image.new("RGBA", rgb.size, (*background, 255))
        return Image.alpha_composite(flat, rgb).convert("RGB")
    icc = im.info.get("icc_profile")
    if im.mode == "CMYK" and icc:
        return _to_srgb(im, icc)
    return _to_srgb(im.convert("RGB"), icc)


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale scaled to 8 bits; Pillow's own conversion clips everything above 255."""
    import numpy as np

    arr = np.asarray(im).astype(np.float64)
    if im.mode == "F":
        top = 1.0 if arr.size and float(arr.max()) <= 1.0 else 255.0
    elif im.mode.startswith("I;16") or (arr.size and float(arr.max()) > 255):
        top = 65535.0
    else:
        top = 255.0
    scaled = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def _to_srgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    """Apply an embedded colour profile (phones' Display P3, print CMYK) so colours are not washed out."""
    if not icc:
        return im if im.mode == "RGB" else im.convert("RGB")
    try:
        from PIL import ImageCms

        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = source.profile.xcolor_space.strip()
        if space != {"RGB": "RGB", "CMYK": "CMYK"}.get(im.mode):
            return im if im.mode == "RGB" else im.convert("RGB")  # e.g. a grey profile on a grey picture
        if "srgb" in (ImageCms.getProfileDescription(source) or "").lower() and im.mode == "RGB":
            return im
        out = ImageCms.profileToProfile(im, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        return out if out is not None else im.convert("RGB")
    except (ImportError, OSError, ValueError, TypeError) as exc:
        log.debug("colour profile not applied: %s", exc)
        return im if im.mode == "RGB" else im.convert("RGB")


def pixel_hash(image: Image.Image) -> str:
    """A hash of the decoded picture: the same picture saved twice (PNG and BMP, say) hashes the same."""
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


# ====================================================================== captions

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
    return {"format": 1, "captions": captions if isinstance(captions, dict) else {},
            "tag_rules": [r for r in rules if isinstance(r, dict)] if isinstance(rules, list) else []}


def original_hashes(prepared: Path) -> dict[str, str]:
    """Prepared stem -> sha256 of the original it was made from, as the manifest records them."""
    items = _read_manifest(Path(prepared)).get("items", {})
    return {str(e["stem"]): str(e["sha256"]) for e in items.values()
            if isinstance(e, dict) and e.get("stem") and e.get("sha256")}


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


# ====================================================================== preparing a folder

@dataclass
class _Source:
    name: str
    path: Path
    stem: str
    caption: Path | None
    auto: Path | None


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _key(text: str) -> str:
    """File names compared as a case-insensitive file system (Windows, macOS) would."""
    return _nfc(text).casefold()


def _scan_originals(originals: Path, report: PrepareReport) -> list[_Source]:
    """The pictures in ``originals`` (sorted), each with its caption files and a unique prepared stem."""
    if not originals.is_dir():
        return []
    files = sorted((p for p in originals.iterdir() if p.is_file() and not p.name.startswith(".")),
                   key=lambda p: _nfc(p.name))
    texts = {_key(p.name): p for p in files if p.name.lower().endswith(CAPTION_SUFFIX)}
    sources: list[_Source] = []
    used: set[str] = set()
    for path in files:
        suffix = path.suffix.lower()
        if suffix == CAPTION_SUFFIX:
            continue
        if suffix not in IMAGE_SUFFIXES:
            report.refused.append(Refusal(path.name, f"not a picture ({path.suffix or 'no'} files are not "
                                                      "used; add JPEG, PNG, WebP, BMP, GIF or TIFF)"))
            continue
        stem = _nfc(path.stem)
        unique = stem
        n = 1
        while _key(unique) in used:
            unique = f"{stem}_{suffix[1:]}" if n == 1 else f"{stem}_{suffix[1:]}{n}"
            n += 1
        used.add(_key(unique))
        sources.append(_Source(path.name, path, unique, texts.get(_key(stem + CAPTION_SUFFIX)),
                               texts.get(_key(stem + AUTO_CAPTION_SUFFIX))))
    return sources


def _read_manifest(prepared: Path) -> dict[str, Any]:
    path = prepared / MANIFEST_NAME
    try:
        data = fileio.read_json(path, "preparing everything again", what="The prepared-dataset manifest")
    except FileNotFoundError:
        return {}
    except UserError as exc:
        log.warning("%s", exc)
        return {}
    return data if isinstance(data, dict) else {}


def _file_hash(path: Path | None) -> str | None:
    return fileio.sha256_file(path) if path is not None else None


def _captioner_id(auto_caption: Callable[[Image.Image], str] | None) -> str | None:
    if auto_caption is None:
        return None
    return f"{getattr(auto_caption, '__module__', '')}.{getattr(auto_caption, '__qualname__', repr(auto_caption))}"


class _Preparer:
    """One ``prepare_dataset`` call; its state is the old manifest, the new one, and the report."""

    def __init__(self, prepared: Path, options: PrepareOptions,
                 auto_caption: Callable[[Image.Image], str] | None) -> None:
        self.prepared = prepared
        self.options = options
        self.auto_caption = auto_caption
        self.captioner = _captioner_id(auto_caption)
        self.report = PrepareReport()
        old = _read_manifest(prepared)
        same_images = old.get("image_options") == options.image_signature()
        self.old_items: dict[str, dict[str, Any]] = old.get("items", {}) if same_images else {}
        self.old_refused: dict[str, dict[str, Any]] = old.get("refused", {}) if same_images else {}
        self.items: dict[str, dict[str, Any]] = {}
        self.refused: dict[str, dict[str, Any]] = {}
        self.by_sha: dict[str, str] = {}
        self.by_pixels: dict[str, str] = {}
        self.edits = read_caption_edits(prepared)

    def manifest(self) -> dict[str, Any]:
        return {"format": 1, "image_options": self.options.image_signature(),
                "caption_options": {"caption_mode": self.options.caption_mode,
                                    "trigger_word": self.options.trigger_word},
                "flip_aug": self.options.flip_aug, "items": self.items, "refused": self.refused}

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
        entry = self._reusable_entry(source, sha)
        image: Image.Image | None = None
        if entry is None:
            try:
                upright_image, upright_size = load_original(source.path, self.options)
            except _Refused as exc:
                self.refuse(source, sha, str(exc))
                return
            entry = {"sha256": sha, "stem": source.stem, "pixels": pixel_hash(upright_image),
                     "source_size": list(upright_size)}
            if self._is_duplicate(source, entry):
                return
            image = self._write_image(upright_image, upright_size, entry)
        elif self._is_duplicate(source, entry):
            return
        self.by_pixels[entry["pixels"]] = source.name
        self._write_caption(source, entry, image)
        self.items[source.name] = entry

    def _reusable_entry(self, source: _Source, sha: str) -> dict[str, Any] | None:
        old = self.old_items.get(source.name)
        if not old or old.get("sha256") != sha or old.get("stem") != source.stem:
            return None
        if not (self.prepared / f"{source.stem}.png").is_file():
            return None
        return dict(old)

    def _is_duplicate(self, source: _Source, entry: dict[str, Any]) -> bool:
        kept = self.by_pixels.get(entry["pixels"])
        if kept is None:
            return False
        self.report.duplicates.append((source.name, kept))
        return True

    def _write_image(self, image: Image.Image, upright_size: tuple[int, int], entry: dict[str, Any]
                     ) -> Image.Image:
        bucket = choose_bucket(upright_size[0], upright_size[1], self.options)
        fitted = fit_to_bucket(image, bucket)
        fileio.write_with(self.prepared / f"{entry['stem']}.png",
                          lambda tmp: fitted.save(tmp, format="PNG", compress_level=6))
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
        keep = {_key(entry["stem"]) for entry in self.items.values()}
        for path in self.prepared.iterdir():
            if not path.is_file():
                continue
            is_temp = path.name.startswith(".") and path.name.endswith(".tmp")
            ours = path.suffix.lower() in (".png", CAPTION_SUFFIX) and not path.name.startswith(".")
            if is_temp or (ours and _key(path.stem) not in keep):
                path.unlink(missing_ok=True)
                self.report.removed += 0 if is_temp else int(path.suffix.lower() == ".png")


def prepare_dataset(originals: Path, prepared: Path, options: PrepareOptions,
                    progress: Callable[[int, int], None] | None = None, *,
                    auto_caption: Callable[[Image.Image], str] | None = None) -> PrepareReport:
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


# ====================================================================== reading prepared items

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
    info = {entry.get("stem"): (name, entry) for name, entry in _read_manifest(prepared).get("items", {}).items()}
    edits = read_caption_edits(prepared)
    items: list[DatasetItem] = []
    for path in sorted(prepared.glob("*.png"), key=lambda p: _nfc(p.name)):
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
        item = DatasetItem(image=path, caption=caption, size=(int(size[0]), int(size[1])), source=source or "",
                           source_size=tuple(source_size) if source_size else None)
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


# ====================================================================== adding originals

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
    used_stems = {_key(p.stem) for p in existing}
    final_stem: dict[tuple[Path, str], str] = {}
    captions: list[Path] = []
    for path in files:
        name = _nfc(path.name)
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
            report.refused.append(Refusal(_nfc(path.name), str(exc)))
    log.debug("%s", report.summary())  # the caller shows the summary (the CLI prints it, the tab displays it)
    return report


def _add_image(path: Path, originals: Path, report: AddReport, hashes: dict[str, str], used_stems: set[str],
               final_stem: dict[tuple[Path, str], str]) -> None:
    name = _nfc(path.name)
    try:
        sha = fileio.sha256_file(path)
    except OSError as exc:
        report.refused.append(Refusal(name, f"could not be read ({exc})"))
        return
    if sha in hashes:
        report.skipped.append(name)
        final_stem[(path.parent, _key(path.stem))] = Path(hashes[sha]).stem
        return
    stem, suffix = _nfc(path.stem), path.suffix
    candidate, n = stem, 1
    while _key(candidate) in used_stems or (originals / f"{candidate}{suffix}").exists():
        candidate = f"{stem}-{n}"
        n += 1
    target = originals / f"{candidate}{suffix}"
    _copy(path, target)
    if candidate != stem:
        report.renamed.append((name, target.name))
    report.added.append(target)
    hashes[sha] = target.name
    used_stems.add(_key(candidate))
    final_stem[(path.parent, _key(path.stem))] = candidate


def _add_caption(path: Path, originals: Path, report: AddReport, final_stem: dict[tuple[Path, str], str]) -> None:
    name = _nfc(path.name)
    parts = _caption_parts(name)
    assert parts is not None
    stem, suffix = parts
    target = originals / f"{final_stem.get((path.parent, _key(stem)), stem)}{suffix}"
    try:
        if target.exists():
            if fileio.sha256_file(target) == fileio.sha256_file(path):
                report.skipped.append(name)
            else:
                report.refused.append(Refusal(name, f"a different caption {target.name} is already there; edit "
                                                    "it in the tab, or delete it first to replace it"))
            return
        _copy(path, target)
    except OSError as exc:
        report.refused.append(Refusal(name, f"could not be copied ({exc})"))
        return
    report.added.append(target)
