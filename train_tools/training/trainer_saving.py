"""What a run leaves in its folder ``trains/<run>/``: the folder with its snapshot of settings and captions,
the LoRA files, and the samples and preview grid made of them.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data.buckets import bucket_info
from ..data.items import tag_frequency
from ..errors import UserError
from ..fileio import write_json
from .resume import clear_leftovers
from .trainer_base import TrainerBase

if TYPE_CHECKING:
    from ..previews.previewer import Previewer

log = logging.getLogger(__name__)

REG_CAPTIONS = "reg_captions.json"  # the run's snapshot of its class pictures' captions (beside captions.json)


class SavingMixin(TrainerBase):
    """The run folder, its snapshot and LoRA files (``save``), and the pictures made of them."""

    _preview: Previewer | None  # made when first needed (``_previewer``), closed by ``_close_previewer``

    def _open_run_dir(self) -> Path:
        """A new run folder with its snapshot of settings and captions, or the resumed run's own folder."""
        acc = self.accelerator
        if self.resume is not None:
            run_dir = self.resume.run_dir
            if acc.is_main_process:
                for path in clear_leftovers(run_dir):
                    log.info("Removed %s, half-written when the run stopped.", path.name)
                if not (run_dir / "settings.json").is_file():
                    self._write_run_snapshot(run_dir)
            return run_dir
        stamp = self.run_name or time.strftime("%Y%m%d-%H%M%S", time.localtime(self.started_at))
        run_dir = self.version.new_run_dir(stamp) if acc.is_main_process else self.version.trains_dir / stamp
        if acc.is_main_process:
            self._write_run_snapshot(run_dir)
        return run_dir

    def _write_run_snapshot(self, run_dir: Path) -> None:
        """The run keeps its own copy of settings and captions, so later edits cannot change what it was."""
        write_json(
            run_dir / "settings.json",
            {
                **self.config.to_dict(),
                "base_model_path": str(self.checkpoint),
                "repeats_used": self.repeats,
                "started_at": self.started_at,
            },
        )
        write_json(run_dir / "captions.json", {item.image.name: item.caption for item in self.dataset_items})
        if self.reg_items:
            write_json(run_dir / REG_CAPTIONS, {item.image.name: item.caption for item in self.reg_items})

    def save(self, path: Path, epoch: int, step: int) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        from ..networks.lora_format import build_metadata, kohya_state_dict, save_lora
        from .optim import describe_optimizer

        unet = acc.unwrap_model(self.model.unet)
        tes = [acc.unwrap_model(te) for te in self.tes] if self.train_te else []
        tensors = kohya_state_dict(unet=unet, text_encoders=tes, family=self.model.family)
        folder = f"{self.repeats}_{self.output_name}"
        metadata = build_metadata(
            self.config,
            family=self.model.family,
            output_name=self.output_name,
            base_model_path=self.checkpoint,
            base_model_sha256=self.base_sha256,
            num_train_images=len(self.items) * self.repeats,
            tag_frequency={folder: tag_frequency(self.items)},
            dataset_dirs={folder: {"n_repeats": self.repeats, "img_count": len(self.items)}},
            epoch=epoch,
            steps=step,
            training_started_at=self.started_at,
            training_finished_at=time.time(),
            bucket_info=bucket_info(self.items),
            mixed_precision=self.mixed_precision_used,
            optimizer=describe_optimizer(self.config.optimizer, self.optimizer, self.config.optimizer_args),
            prediction_type=self.model.prediction_type,
            zero_terminal_snr=bool(self.noise_scheduler.config.get("rescale_betas_zero_snr", False)),
        )
        # kohya's names for the class pictures; ss_tag_frequency and ss_dataset_dirs stay the training pictures'.
        reg_folder = f"1_{self.config.reg_caption.strip() or 'reg'}"
        reg_dirs = {reg_folder: {"n_repeats": 1, "img_count": len(self.reg_items)}} if self.reg_items else {}
        metadata["ss_reg_dataset_dirs"] = json.dumps(reg_dirs)
        metadata["ss_num_reg_images"] = str(len(self.reg_items))
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.config.save_precision]
        save_lora(path, tensors, metadata, dtype=dtype)
        self.reporter.saved(path, epoch)
        return path

    # ------------------------------------------------------------------ previews during and after training
    def _previewer(self) -> Any:
        """The diffusers previewer (its own copy of the base model), made once per run when first needed. The
        host's own generator is not used here: the WebUI's model is unloaded while training runs."""
        if getattr(self, "_preview", None) is None:
            from ..previews.previewer import make_previewer

            self._preview = make_previewer(
                None, self.checkpoint, clip_skip=self.config.clip_skip, device=str(self.device)
            )
        return self._preview

    def _close_previewer(self) -> None:
        preview = getattr(self, "_preview", None)
        if preview is not None:
            preview.close()
            self._preview = None

    def _sample(self, run_dir: Path, lora_file: Path, epoch: int, step: int) -> None:
        """``sample_every_n_epochs``: a few pictures of the file just saved, in ``<run>/samples/``."""
        from ..previews.samples import sample_epoch, should_sample
        from ..previews.settings import default_settings

        if not should_sample(self.config, epoch):
            return
        try:
            settings = default_settings(self.config, self.version.project)
            paths = sample_epoch(run_dir, lora_file, epoch, self._previewer(), settings)
            self.reporter.message(f"Samples of epoch {epoch}: {', '.join(p.name for p in paths)}")
            self.run_log.pictures(paths, step)
        except UserError as exc:  # a sample must never cost the run
            self.reporter.message(f"No samples for epoch {epoch}: {exc}")

    def _previews_at_end(self, run_dir: Path) -> None:
        """``preview_at_end``: the grid of every saved file at every weight, once training is done."""
        from ..previews.samples import previews_at_end

        self.reporter.message("Generating the preview grid")
        try:
            grid = previews_at_end(
                run_dir, self.config, self.version.project, self._previewer(), reporter=self.reporter, stop=self.stop
            )
            if grid is not None:
                self.reporter.message(f"Preview grid: {grid}")
        except UserError as exc:
            self.reporter.message(f"No preview grid: {exc}")
