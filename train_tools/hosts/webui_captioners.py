"""The WebUI's own captioners, used for "deepbooru" and "blip" inside the WebUI: already downloaded, and they
share the GPU with it. Reached only through ``modules``, imported when one is made.
"""

from __future__ import annotations

from typing import Any


class WebuiDeepbooru:
    """``modules.deepbooru.model``: loaded once for a whole dataset (its ``tag()`` loads and unloads the model
    for every picture), unloaded by ``close()``."""

    def __init__(self) -> None:
        from modules import deepbooru

        self.model = deepbooru.model
        self.started = False

    def __call__(self, image: Any) -> str:
        if not self.started:
            self.model.start()
            self.started = True
        return str(self.model.tag_multi(image))

    def close(self) -> None:
        if self.started:
            self.model.stop()
            self.started = False


class WebuiBlip:
    """``shared.interrogator``'s BLIP sentence alone (its ``interrogate()`` appends CLIP artist and style terms,
    which are noise in a training caption); falls back to ``interrogate()`` on hosts without the parts."""

    def __init__(self) -> None:
        from modules import shared

        self.interrogator = shared.interrogator
        self.loaded = False

    def __call__(self, image: Any) -> str:
        it = self.interrogator
        if not (hasattr(it, "generate_caption") and hasattr(it, "load")):
            return str(it.interrogate(image))
        if not self.loaded:
            it.load()
            self.loaded = True
        return str(it.generate_caption(image))

    def close(self) -> None:
        if self.loaded and hasattr(self.interrogator, "send_blip_to_ram"):
            self.interrogator.send_blip_to_ram()  # what the WebUI itself does after interrogating
        self.loaded = False
