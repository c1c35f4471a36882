"""Stand-in for modules.shared: opts, state, cmd_opts and the checkpoint-list helpers."""

from __future__ import annotations

import types
from typing import Any


class OptionInfo:
    def __init__(
        self,
        default: Any = None,
        label: str = "",
        component: Any = None,
        component_args: Any = None,
        onchange: Any = None,
        section: tuple[str, str] | None = None,
        refresh: Any = None,
    ) -> None:
        self.default = default
        self.label = label
        self.section = section


class Options:
    def __init__(self) -> None:
        object.__setattr__(self, "data_labels", {})
        object.__setattr__(self, "data", {})

    def add_option(self, key: str, info: OptionInfo) -> None:
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, item: str) -> Any:
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)

    def __setattr__(self, key: str, value: Any) -> None:
        self.data[key] = value


class State:
    """The fields and methods of the WebUI's shared.state that extensions use."""

    def __init__(self) -> None:
        self.job = ""
        self.job_no = 0
        self.job_count = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = None
        self.interrupted = False
        self.skipped = False
        self.stopping_generation = False
        self.history: list[str] = []

    def begin(self, job: str = "(unknown)") -> None:
        self.job = job
        self.interrupted = False
        self.sampling_step = 0
        self.history.append(f"begin {job}")

    def end(self) -> None:
        self.history.append(f"end {self.job}")
        self.job = ""

    def interrupt(self) -> None:
        self.interrupted = True

    def assign_current_image(self, image: Any) -> None:
        self.history.append("image")


opts = Options()
state = State()
cmd_opts = types.SimpleNamespace(ckpt_dir=None, lora_dir=None, data_dir=None)


def list_checkpoint_tiles(use_short: bool = False) -> list[str]:
    from modules import sd_models

    return list(sd_models.checkpoints_list)


def refresh_checkpoints() -> None:
    from modules import sd_models

    sd_models.list_models()


# Set by the WebUI at start-up (modules.initialize); extensions reach the BLIP interrogator through it.
from modules.interrogate import InterrogateModels  # noqa: E402

interrogator = InterrogateModels()
