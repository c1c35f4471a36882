"""What makes the preview pictures: a ``Previewer``, the host's own or the diffusers one.

In the WebUI it is its own txt2img with ``<lora:name:weight>`` in the prompt (``hosts.webui.WebuiPreviewer``);
standalone and during training it is ``DiffusersPreviewer`` on the run's checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .diffusers_previewer import DiffusersPreviewer

if TYPE_CHECKING:
    from PIL import Image

    from .settings import PreviewSettings


@runtime_checkable
class Previewer(Protocol):
    """Makes one picture: ``lora`` None (or weight 0 in the standalone one) means the base model alone."""

    def generate(self, settings: PreviewSettings, lora: Path | None, weight: float) -> Image.Image: ...

    def close(self) -> None: ...


def make_previewer(host: Any, checkpoint: Path, *, clip_skip: int = 1, device: str | None = None) -> Previewer:
    """The host's own previewer when it has one (the WebUI's txt2img), else diffusers on ``checkpoint``."""
    factory = getattr(host, "make_previewer", None)
    if callable(factory):
        return factory(checkpoint, clip_skip=clip_skip)
    if device is None and host is not None and callable(getattr(host, "device", None)):
        device = host.device()
    return DiffusersPreviewer.from_checkpoint(checkpoint, clip_skip=clip_skip, device=device)
