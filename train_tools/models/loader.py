"""Load a single-file Stable Diffusion checkpoint into diffusers/transformers modules, fully offline.

The steps: read the file (safely), tell the family, choose the offline tokenizers, convert the keys, and put
the tensors into modules built on the meta device (``load_state_dict(assign=True)``), so a checkpoint never
needs a randomly initialised copy of itself in RAM beside the real weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn

from ..fileio import sha256_file
from .checkpoint import read_state_dict
from .configs import (
    ModelSpec,
    build_scheduler,
    build_text_encoder,
    build_unet,
    build_vae,
    spec,
)
from .convert import original_to_diffusers
from .detect import V_PRED_KEY, ZTSNR_KEY, detect_structure, sdxl_marks, unet_predicts_v, yaml_says_v
from .instantiate import instantiate
from .tokenizers import tokenizer_for

log = logging.getLogger(__name__)

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


@dataclass
class LoadedModel:
    family: str
    spec: ModelSpec
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    noise_scheduler: DDPMScheduler
    prediction_type: str
    path: Path

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime): hashing a 7 GB checkpoint takes a while."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def load_model(
    path: Path | str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    yaml_path: Path | None = None,
    tokenizer_dir: Path | None = None,
) -> LoadedModel:
    """Everything the trainer needs from one checkpoint file (``.safetensors`` or ``.ckpt``).

    ``yaml_path`` overrides the sidecar ``<stem>.yaml`` for SD2's v-prediction question; ``tokenizer_dir``
    is a folder with the CLIP vocab.json/merges.txt for full-size models when none is cached.
    """
    path = Path(path)
    start = time.perf_counter()
    log.info("Reading %s", path.name)
    sd = read_state_dict(path)
    family, tiny = detect_structure(sd, path)
    ztsnr = False
    if family == "sdxl":
        xl_v, ztsnr = sdxl_marks(sd, path, yaml_path)
        family, is_v = ("sdxlv" if xl_v else "sdxl"), None
        for marker in (V_PRED_KEY, ZTSNR_KEY):
            sd.pop(marker, None)  # markers, not weights
    else:
        is_v = yaml_says_v(path, yaml_path)
    if is_v and family != "sd2":
        log.warning(
            "%s asks for v-prediction, which is only supported for SD2 and SDXL models; using epsilon.", path.name
        )
        is_v = False
    model_spec = spec("sd2v" if is_v else family, tiny, zero_terminal_snr=ztsnr)
    log.info("%s is %s%s", path.name, model_spec.family.upper(), " (tiny test model)" if tiny else "")

    components = original_to_diffusers(sd, model_spec)
    del sd  # the component dicts share its tensors; nothing else refers to the file's dict
    tokenizers = []
    for te_spec, te_sd in zip(model_spec.text_encoders, components.text_encoders, strict=False):
        vocab = int(te_sd["text_model.embeddings.token_embedding.weight"].shape[0])
        tokenizers.append(tokenizer_for(vocab, te_spec.pad_token, te_spec.tokenizer_kind, tokenizer_dir))

    log.info("Building the UNet")
    unet = instantiate(build_unet(model_spec, empty=True), components.unet, "UNet", device=device, dtype=dtype)
    components.unet.clear()  # drop the file's copies (e.g. fp16) of tensors that were cast or moved
    if family == "sd2" and is_v is None:
        is_v = unet_predicts_v(unet)
        log.info(
            "No config beside %s; its UNet behaves like a %s model",
            path.name,
            "768-v (v-prediction)" if is_v else "512 (epsilon)",
        )
        if is_v:
            # The 768-v config differs in settings only (sample size, attention upcast): rebuild, same tensors.
            model_spec = spec("sd2v", tiny)
            unet = instantiate(build_unet(model_spec, empty=True), dict(unet.state_dict()), "UNet")
    log.info("Building the VAE")
    vae = instantiate(build_vae(model_spec, empty=True), components.vae, "VAE", device=device, dtype=dtype)
    components.vae.clear()
    text_encoders = []
    for i, (te_spec, te_sd) in enumerate(zip(model_spec.text_encoders, components.text_encoders, strict=False)):
        log.info("Building text encoder %d", i + 1)
        text_encoders.append(
            instantiate(
                build_text_encoder(te_spec, empty=True), te_sd, f"text encoder {i + 1}", device=device, dtype=dtype
            )
        )
        te_sd.clear()
    log.info("Loaded %s in %.1f s", path.name, time.perf_counter() - start)
    return LoadedModel(
        family=model_spec.family,
        spec=model_spec,
        unet=unet,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        noise_scheduler=build_scheduler(model_spec),
        prediction_type=model_spec.prediction_type,
        path=path,
    )


def set_training_target(model: LoadedModel, *, v_prediction: bool, zero_terminal_snr: bool) -> None:
    """Turn on the v-prediction target and/or the zero-terminal-SNR schedule (the settings of the same names),
    on top of what the checkpoint says; never off: a marked checkpoint trains as it was made."""
    if not (v_prediction or zero_terminal_snr):
        return
    config = dict(model.noise_scheduler.config)
    if v_prediction:
        model.prediction_type = config["prediction_type"] = "v_prediction"
    if zero_terminal_snr:
        config["rescale_betas_zero_snr"] = True
    model.noise_scheduler = DDPMScheduler.from_config(config)
