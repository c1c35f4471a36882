"""What a preview is made with: the Preview section's settings (prompt, seed, steps, sampler, size, LoRA
weights), their checks, and a version's defaults (its preview prompt or trigger word, its resolution)."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import TrainConfig
from ..errors import UserError
from .samplers import DEFAULT_SAMPLER

DEFAULT_WEIGHTS: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2)
DEFAULT_NEGATIVE_PROMPT = "lowres, bad anatomy, bad hands, worst quality, low quality, blurry"


@dataclass
class PreviewSettings:
    """What the Preview section asks for. ``seed`` -1 picks a random seed once per grid (all cells share it)."""

    prompt: str = ""
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    seed: int = 42
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = DEFAULT_SAMPLER
    width: int = 512
    height: int = 512
    weights: tuple[float, ...] = DEFAULT_WEIGHTS

    def validated(self) -> PreviewSettings:
        """A checked copy (numbers coerced, weights parsed); a UserError names the value to change."""
        try:
            seed, steps = int(self.seed), int(self.steps)
            cfg, width, height = float(self.cfg_scale), int(self.width), int(self.height)
        except (TypeError, ValueError):
            raise UserError("Preview seed, steps, CFG scale, width and height must be numbers.") from None
        if steps < 1 or steps > 150:
            raise UserError(f"Preview steps must be between 1 and 150; got {steps}.")
        if not math.isfinite(cfg) or cfg < 1.0 or cfg > 30.0:
            raise UserError(f"Preview CFG scale must be between 1 and 30; got {cfg:g}.")
        for name, side in (("width", width), ("height", height)):
            if side < 64 or side > 4096 or side % 8:
                raise UserError(f"Preview {name} must be a multiple of 8 between 64 and 4096; got {side}.")
        if seed < -1 or seed > 2**32 - 1:
            raise UserError(f"Preview seed must be -1 (random) or between 0 and {2**32 - 1}; got {seed}.")
        weights = parse_weights(self.weights)
        return dataclasses.replace(
            self,
            prompt=str(self.prompt or ""),
            negative_prompt=str(self.negative_prompt or ""),
            seed=seed,
            steps=steps,
            cfg_scale=cfg,
            sampler=str(self.sampler or DEFAULT_SAMPLER),
            width=width,
            height=height,
            weights=weights,
        )

    def with_fixed_seed(self) -> PreviewSettings:
        """Seed -1 replaced by a random one, so every cell of a grid uses the same number."""
        if self.seed >= 0:
            return self
        return dataclasses.replace(self, seed=random.randrange(2**32))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["weights"] = list(self.weights)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreviewSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known}).validated()


def parse_weights(value: str | Sequence[float | str]) -> tuple[float, ...]:
    """``"0.2, 0.4"`` or a list -> unique weights in the given order; a UserError for anything else."""
    parts = value.replace(";", ",").split(",") if isinstance(value, str) else list(value)
    out: list[float] = []
    for part in parts:
        if isinstance(part, str):
            part = part.strip()
            if not part:
                continue
        try:
            weight = float(part)
        except (TypeError, ValueError):
            raise UserError(f"LoRA weight '{part}' is not a number; write weights like 0.4, 0.8, 1.0.") from None
        if not math.isfinite(weight) or abs(weight) > 10:
            raise UserError(f"LoRA weight {part} is out of range; use numbers between -10 and 10.")
        if weight not in out:
            out.append(weight)
    if not out:
        raise UserError("Give at least one LoRA weight, e.g. 0.4, 0.8, 1.0.")
    return tuple(out)


def trigger_word(config: TrainConfig, project: str) -> str:
    """The word the run put first in every caption (the project name when the setting is empty)."""
    return config.trigger_word.strip() or project


def default_settings(config: TrainConfig, project: str, **changes: Any) -> PreviewSettings:
    """The Preview section's defaults for a version: the preview prompt (else the trigger word) pre-filled,
    the training resolution as the picture size."""
    side = max(64, min(4096, int(config.resolution) // 8 * 8))
    settings = PreviewSettings(
        prompt=config.preview_prompt.strip() or trigger_word(config, project), width=side, height=side
    )
    return dataclasses.replace(settings, **changes).validated() if changes else settings
