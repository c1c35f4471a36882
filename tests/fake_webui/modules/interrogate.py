"""Stand-in for modules.interrogate: the WebUI's BLIP (+CLIP) interrogator, ``shared.interrogator``."""

from __future__ import annotations

from typing import Any


class InterrogateModels:
    def __init__(self) -> None:
        self.blip_model: Any = None
        self.calls: list[str] = []

    def load(self) -> None:
        self.blip_model = object()
        self.calls.append("load")

    def send_blip_to_ram(self) -> None:
        self.calls.append("send_blip_to_ram")

    def unload(self) -> None:
        self.blip_model = None
        self.calls.append("unload")

    def generate_caption(self, pil_image: Any) -> str:
        assert self.blip_model is not None, "generate_caption before load"
        self.calls.append("generate_caption")
        return f"a picture of size {pil_image.width}x{pil_image.height}"

    def interrogate(self, pil_image: Any) -> str:
        self.load()
        return self.generate_caption(pil_image) + ", by an artist, trending on artstation"
