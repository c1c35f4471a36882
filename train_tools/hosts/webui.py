"""The Host for Stable Diffusion WebUI (A1111 1.10, Forge, reForge).

Every ``modules.*`` import happens inside a function: importing this file must work (and cost nothing)
outside the WebUI, and inside it the WebUI's modules are only touched when the tab needs them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..models.resolve import resolve_checkpoint
from ..progress import Reporter, StepInfo, StopFlag, task_amount
from .base import Host

if TYPE_CHECKING:
    from PIL import Image

    from ..previews.settings import PreviewSettings

log = logging.getLogger(__name__)

OPT_UNLOAD = "train_tools_unload_model"
OPT_DEVICE = "train_tools_device"


def webui_paths() -> tuple[Path, list[Path], Path]:
    """(data dir, checkpoint folders, Lora folder) as the WebUI has them, honouring its command-line flags."""
    from modules import paths_internal, shared

    data_dir = Path(paths_internal.data_path)
    models = Path(getattr(paths_internal, "models_path", data_dir / "models"))
    cmd_opts = shared.cmd_opts
    ckpt_dirs = []
    if getattr(cmd_opts, "ckpt_dir", None):
        ckpt_dirs.append(Path(cmd_opts.ckpt_dir))
    ckpt_dirs.append(models / "Stable-diffusion")
    lora_dir = Path(getattr(cmd_opts, "lora_dir", None) or models / "Lora")
    return data_dir, ckpt_dirs, lora_dir


def _opt(name: str, default: Any) -> Any:
    from modules import shared

    return getattr(shared.opts, name, default)


class WebuiReporter(Reporter):
    """Mirrors progress into ``shared.state`` (the WebUI's progress bar and console) and honours its Interrupt."""

    def __init__(self, stop: StopFlag) -> None:
        self.stop = stop

    @staticmethod
    def _state() -> Any:
        from modules import shared

        return shared.state

    def _check_interrupt(self) -> None:
        if getattr(self._state(), "interrupted", False):
            self.stop.request()

    def start(self, total_steps: int, total_epochs: int) -> None:
        state = self._state()
        state.job_count = total_epochs
        state.sampling_steps = total_steps
        state.sampling_step = 0
        state.textinfo = f"Training: {total_steps} steps, {total_epochs} epochs"
        self._check_interrupt()

    def step(self, info: StepInfo) -> None:
        state = self._state()
        state.job_no = max(0, info.epoch - 1)
        state.sampling_step = info.step
        state.sampling_steps = info.total_steps
        state.textinfo = info.line()
        self._check_interrupt()

    def saved(self, path: Path, epoch: int) -> None:
        self._state().textinfo = f"Saved {path.name} (epoch {epoch})"
        log.info("Train Tools: saved %s", path)

    def message(self, text: str) -> None:
        self._state().textinfo = text
        self._check_interrupt()

    def task(self, what: str, done: int, total: int, unit: str = "") -> None:
        """Preparing pictures or downloading a captioner, before training: the WebUI's bar shows it."""
        state = self._state()
        state.sampling_steps, state.sampling_step = total, done
        state.textinfo = f"{what} {task_amount(done, total, unit)}"
        self._check_interrupt()


class WebuiHost(Host):
    """Paths, checkpoints, GPU queue, model unloading and progress from the WebUI's own modules."""

    name = "WebUI"
    offer_demo = False

    def __init__(self) -> None:
        data_dir, ckpt_dirs, lora_dir = webui_paths()
        from modules import paths_internal

        super().__init__(
            data_dir, ckpt_dirs, lora_dir, models_dir=Path(getattr(paths_internal, "models_path", data_dir / "models"))
        )
        self._unloaded = False

    # ------------------------------------------------------------------ checkpoints
    def list_checkpoints(self) -> list[str]:
        from modules import sd_models

        return sorted(sd_models.checkpoints_list.keys(), key=str.lower)

    def refresh_checkpoints(self) -> list[str]:
        from modules import shared

        refresh = getattr(shared, "refresh_checkpoints", None)
        if callable(refresh):
            refresh()
        else:
            from modules import sd_models

            sd_models.list_models()
        return self.list_checkpoints()

    def resolve_checkpoint(self, choice: str) -> Path:
        from modules import sd_models

        info = sd_models.checkpoints_list.get(choice) or sd_models.get_closet_checkpoint_match(choice)
        if info is not None and getattr(info, "filename", None) and Path(info.filename).is_file():
            return Path(info.filename)
        try:
            return resolve_checkpoint(choice, self.ckpt_dirs, any_path=False)
        except UserError:
            raise UserError(
                f"The base model '{choice}' is not in the WebUI's checkpoint list any more; press the "
                "refresh button beside 'Train base model' and choose again."
            ) from None

    # ------------------------------------------------------------------ training
    def device(self) -> str | None:
        chosen = str(_opt(OPT_DEVICE, "") or "").strip()
        if chosen:
            return chosen
        try:
            from modules import devices

            return str(devices.device)
        except (ImportError, AttributeError):
            return None

    def run_on_gpu(self, fn: Callable[[], None]) -> Callable[[], Any]:
        """Run under the WebUI's GPU queue lock, as txt2img and the built-in Train tab do."""
        from modules.call_queue import wrap_gradio_gpu_call

        def train_tools_job(id_task: str) -> list[Any]:
            fn()
            # The WebUI appends its timing HTML to the last output (``res[-1] += ...``): it must be a string.
            return [""]

        wrapped = wrap_gradio_gpu_call(train_tools_job, extra_outputs=[""])

        def call() -> Any:
            import time

            return wrapped(f"task(train_tools_{int(time.time() * 1000)})")

        return call

    def before_training(self) -> None:
        """Move the WebUI's checkpoint off the GPU; only if one is loaded (reading sd_model would load one)."""
        self._unloaded = False
        if not _opt(OPT_UNLOAD, True):
            return
        from modules import sd_models

        model_data = getattr(sd_models, "model_data", None)
        if model_data is not None and getattr(model_data, "sd_model", None) is None:
            return
        unload = getattr(sd_models, "unload_model_weights", None)
        if callable(unload):
            try:
                unload()
                self._unloaded = True
                log.info("Train Tools: moved the WebUI's checkpoint off the GPU for training.")
            except Exception as exc:  # noqa: BLE001 - training can still run beside the model
                log.warning("Train Tools: could not unload the WebUI's checkpoint (%s); training beside it.", exc)

    def after_training(self) -> None:
        if not self._unloaded:
            return
        self._unloaded = False
        from modules import sd_models

        reload = getattr(sd_models, "reload_model_weights", None)
        if callable(reload):
            try:
                reload()
                log.info("Train Tools: brought the WebUI's checkpoint back.")
            except Exception as exc:  # noqa: BLE001 - the WebUI loads it again on the next generation
                log.warning("Train Tools: could not reload the WebUI's checkpoint (%s); it loads on next use.", exc)
        try:
            from modules import devices

            devices.torch_gc()
        except (ImportError, AttributeError):
            pass

    def progress_sink(self, stop: StopFlag) -> Reporter | None:
        return WebuiReporter(stop)

    # ------------------------------------------------------------------ previews
    def captioner(self, kind: str) -> Callable[[Any], str] | None:
        """The WebUI's own DeepBooru and BLIP: already downloaded, and they share the GPU with the WebUI."""
        from .webui_captioners import WebuiBlip, WebuiDeepbooru

        if kind == "deepbooru":
            return WebuiDeepbooru()
        if kind == "blip":
            return WebuiBlip()
        return None

    def make_previewer(self, checkpoint: Path | None, *, clip_skip: int | None = None) -> WebuiPreviewer:
        """Previews by the WebUI's own txt2img (see ``previews.previewer.make_previewer``)."""
        return WebuiPreviewer(self.lora_dir, checkpoint, clip_skip=clip_skip)


# The folder inside the Lora folder where a run's files are put while the WebUI makes their previews.
PREVIEW_SUBDIR = "train_tools_previews"


class WebuiPreviewer:
    """Preview pictures from the WebUI's own txt2img, with ``<lora:name:weight>`` in the prompt.

    The WebUI only finds a LoRA in its Lora folder (it lists the folder again when a name is unknown), so each
    run file is copied to ``<Lora folder>/train_tools_previews/`` under a short, prompt-safe unique name while
    the previews are made; ``close()`` removes the copies. ``checkpoint`` (the run's base model) and
    ``clip_skip`` are passed as per-picture setting overrides, restored by the WebUI afterwards. Call
    ``generate`` under the WebUI's GPU queue (``WebuiHost.run_on_gpu``).
    """

    def __init__(self, lora_dir: Path, checkpoint: Path | None = None, *, clip_skip: int | None = None) -> None:
        self.lora_dir = Path(lora_dir)
        self.folder = self.lora_dir / PREVIEW_SUBDIR
        self.checkpoint_title = checkpoint_title(checkpoint) if checkpoint is not None else None
        self.clip_skip = clip_skip
        self._copies: dict[Path, str] = {}

    def network_name(self, lora: Path) -> str:
        """The name the WebUI knows ``lora`` by (copied into the Lora folder on first use)."""
        from .. import fileio

        source = Path(lora).resolve()
        if source not in self._copies:
            stat = source.stat()
            digest = hashlib.sha256(f"{source}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
            name = f"tt_preview_{digest}"
            fileio.write_with(self.folder / f"{name}.safetensors", lambda tmp: shutil.copyfile(source, tmp))
            self._copies[source] = name
        return self._copies[source]

    def prompt_for(self, prompt: str, lora: Path | None, weight: float) -> str:
        if lora is None:
            return prompt
        tag = f"<lora:{self.network_name(lora)}:{weight:g}>"
        return f"{prompt}, {tag}" if prompt.strip() else tag

    def generate(self, settings: PreviewSettings, lora: Path | None, weight: float) -> Image.Image:
        from modules import processing

        overrides: dict[str, Any] = {}
        if self.checkpoint_title:
            overrides["sd_model_checkpoint"] = self.checkpoint_title
        if self.clip_skip:
            overrides["CLIP_stop_at_last_layers"] = int(self.clip_skip)
        p = processing.StableDiffusionProcessingTxt2Img(
            prompt=self.prompt_for(settings.prompt, lora, weight),
            negative_prompt=settings.negative_prompt,
            seed=int(settings.seed),
            steps=int(settings.steps),
            cfg_scale=float(settings.cfg_scale),
            sampler_name=settings.sampler,
            width=int(settings.width),
            height=int(settings.height),
            batch_size=1,
            n_iter=1,
            do_not_save_samples=True,
            do_not_save_grid=True,
            override_settings=overrides,
            override_settings_restore_afterwards=True,
        )
        try:
            processed = processing.process_images(p)
        finally:
            close = getattr(p, "close", None)
            if callable(close):
                close()
        images = list(getattr(processed, "images", None) or [])
        if not images:
            raise UserError("The WebUI made no preview picture (was it interrupted?); press Generate previews again.")
        return images[0].convert("RGB")

    def close(self) -> None:
        for name in self._copies.values():
            (self.folder / f"{name}.safetensors").unlink(missing_ok=True)
        self._copies.clear()
        with contextlib.suppress(OSError):  # not empty (the user's own files) or not there
            self.folder.rmdir()

    def __enter__(self) -> WebuiPreviewer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def checkpoint_title(checkpoint: Path) -> str | None:
    """The WebUI's title of the checkpoint file (what its ``sd_model_checkpoint`` setting holds), if listed."""
    from modules import sd_models

    wanted = Path(checkpoint).resolve()
    for title, info in sd_models.checkpoints_list.items():
        filename = getattr(info, "filename", None)
        if filename and Path(filename).resolve() == wanted:
            return str(getattr(info, "title", title))
    log.warning(
        "Train Tools: %s is not in the WebUI's checkpoint list; previews use the loaded checkpoint.",
        Path(checkpoint).name,
    )
    return None


def add_settings() -> None:
    """The tab's entries in Settings > Train Tools (called from ``on_ui_settings``)."""
    from modules import shared

    section = ("train_tools", "Train Tools")
    shared.opts.add_option(
        OPT_UNLOAD,
        shared.OptionInfo(
            True, "Move the loaded checkpoint off the GPU while training (brought back afterwards)", section=section
        ),
    )
    shared.opts.add_option(
        OPT_DEVICE,
        shared.OptionInfo("", "Device to train on (empty: the WebUI's device; e.g. cuda:1)", section=section),
    )
