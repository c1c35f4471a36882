"""The BLIP captioner: one short sentence per picture from a BLIP model (transformers).

The model is a folder given, the copy under ``<models>/train_tools/blip/``, or downloaded there once;
torch and transformers are imported and the model loaded at the first picture.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import UserError
from ..progress import ProgressFn
from .hub_download import hf_download, may_download
from .pictures import on_white

log = logging.getLogger(__name__)

DEFAULT_BLIP_REPO = "Salesforce/blip-image-captioning-base"


class BlipCaptioner:
    """A BLIP captioning model (``BlipForConditionalGeneration``) writing one short sentence per picture."""

    def __init__(
        self,
        model_dir_or_repo: str | Path = DEFAULT_BLIP_REPO,
        *,
        device: str | None = None,
        models_dir: Path | None = None,
        allow_download: bool | None = None,
        progress: ProgressFn | None = None,
        max_new_tokens: int = 40,
        prompt: str = "",
    ) -> None:
        self.source = str(model_dir_or_repo)
        self.folder = resolve_blip(
            model_dir_or_repo, models_dir=models_dir, allow_download=allow_download, progress=progress
        )
        self.device = device
        self.max_new_tokens = int(max_new_tokens)
        self.prompt = prompt
        self._model: Any = None
        self._processor: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"BlipCaptioner({self.folder.name}, max_new_tokens={self.max_new_tokens}, prompt={self.prompt!r})"

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._model is None:
                import torch
                from transformers import BlipForConditionalGeneration, BlipProcessor

                device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
                dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
                try:
                    processor = BlipProcessor.from_pretrained(str(self.folder))
                    model = BlipForConditionalGeneration.from_pretrained(str(self.folder), torch_dtype=dtype)
                except (OSError, ValueError) as exc:
                    raise UserError(
                        f"The BLIP model in {self.folder} could not be loaded ({exc}); download it again."
                    ) from None
                self._model, self._processor = model.to(device).eval(), processor
                self.device = str(device)
                log.info("Loaded the BLIP captioner %s on %s", self.folder, device)
            return self._model, self._processor

    def caption_many(self, images: Sequence[Image.Image]) -> list[str]:
        import torch

        model, processor = self._load()
        rgb = [on_white(im) for im in images]
        kwargs: dict[str, Any] = {"images": rgb, "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(rgb)
        inputs = processor(**kwargs).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return [" ".join(processor.decode(row, skip_special_tokens=True).split()) for row in ids]

    def __call__(self, image: Image.Image) -> str:
        return self.caption_many([image])[0]


def blip_folder(models_dir: Path, repo: str = DEFAULT_BLIP_REPO) -> Path:
    """Where Train Tools keeps (and downloads) a BLIP model."""
    return Path(models_dir) / "train_tools" / "blip" / repo.rstrip("/").split("/")[-1]


def resolve_blip(
    model_dir_or_repo: str | Path,
    *,
    models_dir: Path | None = None,
    allow_download: bool | None = None,
    progress: ProgressFn | None = None,
) -> Path:
    """A local folder holding the BLIP model: the folder given, the copy under ``models_dir``, or a download."""
    given = Path(str(model_dir_or_repo)).expanduser()
    if (given / "config.json").is_file():
        return given
    repo = str(model_dir_or_repo)
    if given.is_absolute() or given.exists() or repo.count("/") != 1:
        raise UserError(
            f"'{repo}' is neither a BLIP model folder (with config.json) nor a Hugging Face model "
            "name like Salesforce/blip-image-captioning-base."
        )
    base = Path(models_dir) if models_dir is not None else Path.home() / ".cache" / "train_tools" / "models"
    folder = blip_folder(base, repo)
    if (folder / "config.json").is_file():
        return folder
    if not may_download(allow_download):
        raise UserError(
            f"The BLIP model {repo} is not downloaded and downloads are off: put the files of "
            f"https://huggingface.co/{repo} (config.json, the weights, the processor files) in "
            f"{folder}."
        )
    log.info("Downloading the BLIP model %s into %s", repo, folder)
    for filename in _blip_files(repo):
        hf_download(repo, filename, folder, progress)
    return folder


def _blip_files(repo: str) -> list[str]:
    """The files a BLIP repository needs: configs, tokenizer and one copy of the weights (safetensors if any)."""
    from huggingface_hub import HfApi

    try:
        files = HfApi().list_repo_files(repo)
    except Exception as exc:  # noqa: BLE001 - network and hub errors have many types; all mean "not now"
        raise UserError(
            f"The BLIP model {repo} could not be listed ({type(exc).__name__}: {exc}); check the "
            "internet connection and the name."
        ) from None
    wanted = [f for f in files if "/" not in f and f.endswith((".json", ".txt"))]
    weights = "model.safetensors" if "model.safetensors" in files else "pytorch_model.bin"
    if weights not in files:
        raise UserError(f"{repo} holds no model weights (model.safetensors or pytorch_model.bin).")
    return [*wanted, weights]
