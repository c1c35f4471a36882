"""What the tab needs from the program it lives in: paths, checkpoints, the GPU, progress.

The tab (``ui.py``) talks only to a ``Host``. ``StandaloneHost`` is the plain app (``python -m train_tools``);
``webui_host.WebuiHost`` adapts Stable Diffusion WebUI (A1111, Forge, reForge). Keeping every host fact here
means the tab itself is the same code in both places.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..models.resolve import default_ckpt_dirs, resolve_checkpoint, scan_checkpoints
from ..progress import Reporter, StopFlag

log = logging.getLogger(__name__)

# Shown in the base-model list when the user has no checkpoint yet; chosen, it installs the tiny shapes demo model.
DEMO_CHOICE = "Use demo model (tiny, draws only simple shapes: tries the whole flow on a CPU)"
DEMO_FILE_NAME = "train_tools_demo.safetensors"


class Host:
    """The interface the tab talks to. Subclasses fill in the facts of one program."""

    #: A short name for messages ("standalone", "WebUI").
    name = "host"
    #: Whether the tab offers the built-in demo pictures (and, with no checkpoint, the demo model).
    offer_demo = False

    def __init__(
        self, data_dir: Path, ckpt_dirs: Sequence[Path], lora_dir: Path, models_dir: Path | None = None
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.ckpt_dirs = [Path(d).expanduser().resolve() for d in ckpt_dirs]
        self.lora_dir = Path(lora_dir).expanduser().resolve()
        # Where captioner models (WD14, BLIP) are looked for and downloaded to.
        self.models_dir = Path(models_dir).expanduser().resolve() if models_dir else self.data_dir / "models"

    # ------------------------------------------------------------------ checkpoints
    def list_checkpoints(self) -> list[str]:
        """The choices of the base-model dropdown."""
        return scan_checkpoints(self.ckpt_dirs)

    def refresh_checkpoints(self) -> list[str]:
        """Re-read the checkpoint folders (the Refresh button), then list them."""
        return self.list_checkpoints()

    def resolve_checkpoint(self, choice: str) -> Path:
        """The checkpoint file for a dropdown choice; a UserError says what to do when there is none."""
        return resolve_checkpoint(choice, self.ckpt_dirs, any_path=False)

    # ------------------------------------------------------------------ training
    def device(self) -> str | None:
        """The torch device to train on; None lets the trainer pick (CUDA when available)."""
        return None

    def run_on_gpu(self, fn: Callable[[], None]) -> Callable[[], Any]:
        """Wrap ``fn`` so it runs when the GPU is ours (the WebUI's queue); the plain app runs it as is."""
        return fn

    def before_training(self) -> None:
        """Free the GPU for training (the WebUI moves its loaded checkpoint off it)."""

    def after_training(self) -> None:
        """Undo ``before_training`` (the WebUI brings its checkpoint back)."""

    def progress_sink(self, stop: StopFlag) -> Reporter | None:
        """A reporter mirroring progress into the host (the WebUI's ``shared.state``), or None.

        It may also request ``stop`` when the host's own Interrupt button is pressed.
        """
        return None

    def captioner(self, kind: str) -> Callable[[Any], str] | None:
        """The host's own automatic captioner of ``kind`` ("blip", "deepbooru"): picture in, caption out.

        None (the default) means the host has none, and ``captioners.make_captioner`` uses Train Tools' own.
        """
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "data_dir": str(self.data_dir),
            "ckpt_dirs": [str(d) for d in self.ckpt_dirs],
            "lora_dir": str(self.lora_dir),
        }


def default_lora_dir(data_dir: Path) -> Path:
    """The standalone app's and the command line's LoRA folder when none is given: the WebUI's place for it."""
    return Path(data_dir) / "models" / "Lora"


class StandaloneHost(Host):
    """The app on its own: folders from the command line, the GPU all ours, the demo model on offer."""

    name = "standalone"

    def __init__(
        self,
        data_dir: Path,
        ckpt_dirs: Sequence[Path] | None = None,
        lora_dir: Path | None = None,
        *,
        offer_demo: bool = True,
        device: str | None = None,
    ) -> None:
        data_dir = Path(data_dir).expanduser().resolve()
        super().__init__(
            data_dir,
            list(ckpt_dirs) if ckpt_dirs else default_ckpt_dirs(data_dir),
            lora_dir or default_lora_dir(data_dir),
        )
        self.offer_demo = offer_demo
        self._device = device

    @property
    def demo_checkpoint_path(self) -> Path:
        # The first checkpoint folder: the demo then shows up in the list like any other checkpoint.
        return self.ckpt_dirs[0] / DEMO_FILE_NAME

    def list_checkpoints(self) -> list[str]:
        found = super().list_checkpoints()
        if self.offer_demo and not found:
            return [DEMO_CHOICE]
        return found

    def resolve_checkpoint(self, choice: str) -> Path:
        if self.offer_demo and choice == DEMO_CHOICE:
            return self.build_demo_checkpoint()
        return super().resolve_checkpoint(choice)

    def build_demo_checkpoint(self) -> Path:
        """Put the shipped shapes demo model into the checkpoint folder on first use; later uses find it there."""
        from ..models.demo_model import install_shapes_demo

        return install_shapes_demo(self.demo_checkpoint_path)

    def device(self) -> str | None:
        return self._device


def require_checkpoint_choice(choice: str | None) -> str:
    if not choice:
        raise UserError("Choose a base model in 'Train base model' (press the refresh button if the list is empty).")
    return choice
