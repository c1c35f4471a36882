"""Reading one picture: any common format, colour mode and orientation in; upright 8-bit sRGB out.

``load_original`` turns the EXIF orientation upright, flattens transparency onto the background colour,
scales high bit depths, applies colour profiles, and refuses (``Refused``, with the reason shown to the user)
files that are empty, damaged, not pictures, too small or too large to decode safely; the size checks read
only the header. ``pixel_hash`` lets the prepare job spot the same picture saved twice; ``on_white`` is the RGB
picture the captioners take.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from .buckets import choose_bucket
from .prepare_options import PrepareOptions

log = logging.getLogger(__name__)

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


class Refused(Exception):
    """The file cannot be used; the message is the reason shown to the user."""


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


def load_original(path: Path, options: PrepareOptions) -> tuple[Image.Image, tuple[int, int], Image.Image | None]:
    """The picture upright and in RGB (alpha flattened), its upright full size, and its alpha channel upright
    (``L``; None for an opaque picture: the masked loss's mask); raises ``Refused``.

    Checks that need only the header (pixel count, smallest side) run before any pixel is decoded. Large
    JPEGs are decoded at a reduced scale that still covers their bucket, which is much faster.
    """
    try:
        if path.stat().st_size == 0:
            raise Refused("the file is empty (0 bytes)")
        with _pixel_limit(None):
            im = Image.open(path)
        try:
            return _decode(im, options)
        finally:
            im.close()
    except Refused:
        raise
    except Image.UnidentifiedImageError:
        raise Refused("not a picture: its contents are not an image format that can be read") from None
    except Image.DecompressionBombError as exc:
        raise Refused(f"too large to decode safely ({exc})") from None
    except OSError as exc:
        text = str(exc)
        if "truncated" in text or "broken data stream" in text or "end of file" in text.lower():
            raise Refused("the file is damaged or incomplete (its image data ends early)") from None
        raise Refused(f"the file could not be read ({text})") from None
    except (SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, ZeroDivisionError) as exc:
        # Pillow's decoders report damaged headers with these.
        raise Refused(f"the file is damaged ({type(exc).__name__}: {exc})") from None


def _decode(im: Image.Image, options: PrepareOptions) -> tuple[Image.Image, tuple[int, int], Image.Image | None]:
    w, h = im.size
    if w * h > options.max_pixels:
        raise Refused(
            f"too large: {w}x{h} is {w * h:,} pixels, more than the limit of {options.max_pixels:,} "
            "(a possible decompression bomb)"
        )
    if min(w, h) < options.min_image_size:
        raise Refused(f"too small: {w}x{h}; the shorter side must be at least {options.min_image_size} pixels")
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
    alpha = alpha_of(im)
    fix = _ORIENTATION_FIX.get(orientation)
    if fix is not None:
        rgb = rgb.transpose(fix)
        alpha = alpha.transpose(fix) if alpha is not None else None
    return rgb, upright, alpha


def load_mask(path: Path, options: PrepareOptions) -> Image.Image:
    """A loss mask picture (``name.mask.png``) in ``L``, decoded under the pictures' pixel limit (a mask is an
    upload like the pictures); raises ``Refused``."""
    try:
        with _pixel_limit(options.max_pixels), Image.open(path) as im:
            return im.convert("L")
    except Image.DecompressionBombError as exc:
        raise Refused(f"its mask {path.name} is too large to decode safely ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise Refused(f"its mask {path.name} could not be read ({exc})") from None


def alpha_of(im: Image.Image) -> Image.Image | None:
    """The picture's transparency as an ``L`` mask (255 = opaque), or None where every pixel is opaque."""
    if not (im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info):
        return None
    alpha = (im.convert("LA").convert("RGBA") if im.mode == "La" else im.convert("RGBA")).getchannel("A")
    return None if alpha.getextrema() == (255, 255) else alpha


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


def on_white(image: Image.Image) -> Image.Image:
    """RGB with any transparency flattened onto white (what the tagger was trained on)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
