"""Stand-in for modules.deepbooru: the WebUI's DeepDanbooru tagger object ``model`` (start/tag_multi/stop/tag)."""

from __future__ import annotations

from typing import Any


class DeepDanbooru:
    """Tags a picture by its dominant colour, so tests can tell which picture was tagged."""

    def __init__(self) -> None:
        self.loaded = False
        self.calls: list[str] = []

    def start(self) -> None:
        self.loaded = True
        self.calls.append("start")

    def stop(self) -> None:
        self.loaded = False
        self.calls.append("stop")

    def tag_multi(self, pil_image: Any, force_disable_ranks: bool = False) -> str:
        assert self.loaded, "tag_multi before start"
        self.calls.append("tag_multi")
        r, g, b = pil_image.convert("RGB").resize((1, 1)).getpixel((0, 0))
        colour = "red" if r >= max(g, b) else "green" if g >= b else "blue"
        return f"1girl, {colour}_background, solo"

    def tag(self, pil_image: Any) -> str:
        self.start()
        try:
            return self.tag_multi(pil_image)
        finally:
            self.stop()


model = DeepDanbooru()
