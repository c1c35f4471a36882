"""The samplers of the standalone previewer, under the WebUI's names, as diffusers schedulers."""

from __future__ import annotations

from typing import Any

from ..errors import UserError

DEFAULT_SAMPLER = "Euler a"
#: The samplers the standalone previewer has, under the WebUI's names (the WebUI takes any of its own).
SAMPLERS: tuple[str, ...] = ("Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "UniPC", "Heun")


def scheduler_for(name: str, base_config: Any) -> Any:
    """A diffusers scheduler that samples like the WebUI's sampler ``name``.

    The WebUI's k-diffusion samplers space their steps evenly over the whole schedule ("linspace"); its DDIM
    uses the original "leading" spacing with an offset of 1.
    """
    import diffusers

    # Without the "_" keys: diffusers' ``_use_default_values`` would make the new scheduler drop every setting
    # the base one left at its default, the two below included.
    config = {key: value for key, value in dict(base_config).items() if not key.startswith("_")}
    config.update(steps_offset=1, timestep_spacing="linspace")
    table: dict[str, tuple[str, dict[str, Any]]] = {
        "Euler a": ("EulerAncestralDiscreteScheduler", {}),
        "Euler": ("EulerDiscreteScheduler", {}),
        "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        "DPM++ 2M Karras": (
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        ),
        "DDIM": ("DDIMScheduler", {"timestep_spacing": "leading", "set_alpha_to_one": False}),
        "UniPC": ("UniPCMultistepScheduler", {}),
        "Heun": ("HeunDiscreteScheduler", {}),
    }
    if name not in table:
        raise UserError(
            f"The sampler '{name}' is not available outside the WebUI; choose one of {', '.join(SAMPLERS)}."
        )
    cls_name, extra = table[name]
    config.update(extra)
    return getattr(diffusers, cls_name).from_config(config)
