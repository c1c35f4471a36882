"""What decides how a folder's prepared pictures and captions look: ``PrepareOptions`` (the resolution and
bucket settings, the caption mode, the trigger word, the limits that refuse a picture).

``image_signature`` names the options that change the prepared pixels: the manifest keeps it, and a change
redoes every picture (``PIPELINE_VERSION`` does the same when the way pictures are made changes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from PIL import ImageColor

from ..config import CAPTION_MODES, TrainConfig
from ..errors import UserError

# Bump when the way prepared images are made changes, so that every prepared folder is redone once.
PIPELINE_VERSION = 2  # 2: the loss masks (prepared/.masks/) beside the pictures


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
            raise UserError(
                f"Background colour '{self.background_color}' is not a colour; write it like #ffffff."
            ) from None
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
