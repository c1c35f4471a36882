"""Test pictures, made at test time (nothing binary is committed): every format and colour mode people have,
and the broken files they also have.

``write_zoo(folder)`` writes them and returns what each one should become: for a usable picture its upright
(w, h) and the colour at its centre, for a bad one a word its refusal reason must contain.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ORANGE = (230, 120, 30)
GREEN = (20, 180, 60)


@dataclass
class Expect:
    """What a zoo file should turn into."""

    size: tuple[int, int] | None = None  # upright (w, h) of a usable picture
    centre: tuple[int, int, int] | None = None  # colour near the centre, when it is known
    refused: str | None = None  # a word the refusal reason contains


def _solid(mode: str, size: tuple[int, int], colour: tuple[int, int, int] = ORANGE) -> Image.Image:
    return Image.new("RGB", size, colour).convert(mode)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with only a few bytes of data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def noisy_rgb(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def exif_rotated_jpeg(path: Path, stored: tuple[int, int] = (240, 160), orientation: int = 6) -> None:
    """A JPEG stored landscape whose EXIF says: turn it 90° to show it (as phones write portrait photos).

    The left third is green, so after the turn the top of the upright picture is green."""
    im = Image.new("RGB", stored, ORANGE)
    im.paste(GREEN, (0, 0, stored[0] // 3, stored[1]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, format="JPEG", quality=95, exif=exif.tobytes())


def transparent_png(path: Path, size: tuple[int, int] = (160, 128)) -> None:
    """Left half fully transparent (its hidden colour is black), right half opaque green."""
    im = Image.new("RGBA", size, (0, 0, 0, 0))
    im.paste((*GREEN, 255), (size[0] // 2, 0, size[0], size[1]))
    im.save(path, format="PNG")


def palette_transparent_png(path: Path, size: tuple[int, int] = (136, 136)) -> None:
    """A palette PNG whose index 0 is transparent (left half) and index 1 is orange (right half)."""
    im = Image.new("P", size, 0)
    im.putpalette([0, 0, 0, *ORANGE] + [0] * (256 - 2) * 3)
    im.paste(1, (size[0] // 2, 0, size[0], size[1]))
    im.save(path, format="PNG", transparency=0)


def grey16_png(path: Path, size: tuple[int, int] = (128, 96)) -> None:
    """A 16-bit greyscale PNG at half of full scale (32768): 8-bit grey ~128 when scaled, white when clipped."""
    arr = np.full((size[1], size[0]), 32768, dtype=np.uint16)
    Image.fromarray(arr).save(path, format="PNG")


def animated_gif(path: Path, size: tuple[int, int] = (128, 128)) -> None:
    """Two frames: orange first, blue second; the first frame is the picture."""
    first = Image.new("RGB", size, ORANGE)
    second = Image.new("RGB", size, (20, 40, 220))
    first.save(path, format="GIF", save_all=True, append_images=[second], duration=100)


def truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    noisy_rgb((256, 256), seed=1).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])


def write_zoo(folder: Path) -> dict[str, Expect]:
    """Write every zoo file into ``folder``; returns file name -> what it should become."""
    folder.mkdir(parents=True, exist_ok=True)
    zoo: dict[str, Expect] = {}

    def save(name: str, image: Image.Image, expect: Expect, **kwargs: object) -> None:
        image.save(folder / name, **kwargs)
        zoo[name] = expect

    save("rgb.jpg", _solid("RGB", (300, 200)), Expect((300, 200), ORANGE), quality=95)
    save("rgb.png", _solid("RGB", (200, 300)), Expect((200, 300), ORANGE))
    save("rgb.webp", _solid("RGB", (256, 192)), Expect((256, 192), ORANGE), quality=95)
    save("rgb.bmp", _solid("RGB", (192, 256), GREEN), Expect((192, 256), GREEN))
    save("rgb.tiff", _solid("RGB", (160, 160), GREEN), Expect((160, 160), GREEN))
    save("cmyk.jpg", _solid("CMYK", (256, 128)), Expect((256, 128), ORANGE), quality=95)
    save("cmyk.tif", _solid("CMYK", (128, 256)), Expect((128, 256), ORANGE))
    save(
        "palette.png",
        _solid("RGB", (112, 112)).convert("P", palette=Image.Palette.ADAPTIVE),
        Expect((112, 112), ORANGE),
    )
    save("grey.png", _solid("L", (144, 96)), Expect((144, 96)))
    save("grey_alpha.png", _solid("LA", (96, 144)), Expect((96, 144)))
    save("bilevel.png", Image.new("1", (96, 96), 1), Expect((96, 96), (255, 255, 255)))
    grey16_png(folder / "grey16.png")
    zoo["grey16.png"] = Expect((128, 96), (128, 128, 128))
    animated_gif(folder / "animated.gif")
    zoo["animated.gif"] = Expect((128, 128), ORANGE)
    palette_transparent_png(folder / "palette_alpha.png")
    zoo["palette_alpha.png"] = Expect((136, 136))
    transparent_png(folder / "transparent.png")
    zoo["transparent.png"] = Expect((160, 128))
    exif_rotated_jpeg(folder / "rotated.jpg")
    zoo["rotated.jpg"] = Expect((160, 240))
    save("日本語の名前 🐱.png", _solid("RGB", (128, 192), GREEN), Expect((128, 192), GREEN))
    # The bad ones.
    save("tiny.png", Image.new("RGB", (1, 1), ORANGE), Expect(refused="too small"))
    (folder / "bomb.png").write_bytes(bomb_png())
    zoo["bomb.png"] = Expect(refused="too large")
    truncated_jpeg(folder / "truncated.jpg")
    zoo["truncated.jpg"] = Expect(refused="damaged")
    (folder / "text.png").write_text("this is not a picture\n", encoding="utf-8")
    zoo["text.png"] = Expect(refused="not a picture")
    (folder / "empty.jpg").write_bytes(b"")
    zoo["empty.jpg"] = Expect(refused="empty")
    return zoo
