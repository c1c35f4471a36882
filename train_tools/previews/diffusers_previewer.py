"""The standalone previewer: the run's checkpoint in diffusers with the LoRA merged into the weights by our
own code as ``W + up @ down * alpha / rank * weight`` (the WebUI's formula), so it needs neither peft nor
diffusers' LoRA loader and works on every diffusers version the hosts ship.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .samplers import DEFAULT_SAMPLER, scheduler_for

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch import nn

    from ..models.loader import LoadedModel
    from ..models.text_encoding import Conditioning
    from .settings import PreviewSettings

log = logging.getLogger(__name__)

# WebUI extra-network tags; the standalone previewer applies the LoRA itself, so typed tags are dropped.
_EXTRA_NETWORK_TAG = re.compile(r"<(?:lora|lyco|hypernet):[^>]*>", re.IGNORECASE)
# The text-encoder part of a kohya key: lora_te (SD1/SD2) or lora_te1 / lora_te2 (SDXL).
_TE_PREFIX = re.compile(r"^(lora_te\d?)_")


def _sd_pipeline(model: LoadedModel) -> Any:
    """SD1/SD2's pipeline on our modules; no safety checker (the pictures are the user's own LoRA)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoders[0],
        tokenizer=model.tokenizers[0],
        unet=model.unet,
        scheduler=scheduler_for(DEFAULT_SAMPLER, model.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl_pipeline(model: LoadedModel) -> Any:
    """SDXL's pipeline on our modules; its size conditioning (``add_time_ids``) is what the pictures need, the
    prompt is encoded by ``DiffusersPreviewer.encode``. No watermark: it needs a package the hosts lack."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=model.vae,
        text_encoder=model.text_encoders[0],
        text_encoder_2=model.text_encoders[1],
        tokenizer=model.tokenizers[0],
        tokenizer_2=model.tokenizers[1],
        unet=model.unet,
        scheduler=scheduler_for(DEFAULT_SAMPLER, model.noise_scheduler.config),
        add_watermarker=False,
    )


class DiffusersPreviewer:
    """The run's checkpoint in a diffusers ``StableDiffusionPipeline`` (SD1, SD2, SD2-v) or
    ``StableDiffusionXLPipeline`` (SDXL); LoRA files merged into the weights.

    Merging keeps a copy of every weight a LoRA touches, so switching files or weights restores the exact
    original before adding the next update: "no LoRA" and weight 0 give the base model's picture bit for bit.
    The prompt is encoded by our own code as the trainer does (75-token chunks, clip skip for SD1; for SDXL
    both encoders' penultimate layers side by side and the second's pooled output), so it matches what the
    LoRA was trained on on every transformers version. The pipeline stops at the latents and the VAE, kept
    in float32, decodes them: a half-precision VAE overflows (SDXL's above all) into black pictures.
    """

    def __init__(self, model: LoadedModel, *, clip_skip: int = 1, device: str | torch.device | None = None) -> None:
        import torch

        from ..networks.lora_format import FAMILIES

        if model.family not in FAMILIES or len(model.text_encoders) not in (1, 2):
            raise UserError(
                f"Previews of {model.family.upper()} checkpoints are not supported outside the WebUI; "
                "use an SD1, SD2 or SDXL checkpoint."
            )
        self.model = model
        self.clip_skip = int(clip_skip)
        self.device = torch.device(device) if device is not None else next(model.unet.parameters()).device
        self.is_sdxl = len(model.text_encoders) == 2
        if model.vae.dtype != torch.float32:
            model.vae.float()  # it only decodes here; the previewer owns this copy of the model
        self.pipe = _sdxl_pipeline(model) if self.is_sdxl else _sd_pipeline(model)
        self.pipe.set_progress_bar_config(disable=True)
        self._sampler = DEFAULT_SAMPLER
        self._layers: dict[str, nn.Linear | nn.Conv2d] | None = None
        self._originals: dict[str, torch.Tensor] = {}
        self._lora_path: Path | None = None
        self._lora: dict[str, dict[str, torch.Tensor]] = {}
        self._applied: tuple[Path | None, float] = (None, 0.0)

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Path, *, clip_skip: int = 1, device: str | None = None, dtype: torch.dtype | None = None
    ) -> DiffusersPreviewer:
        """Load ``checkpoint`` for previews: on the GPU in fp16 when there is one, else on the CPU in fp32."""
        import torch

        from ..models.loader import load_model

        target = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.float16 if target.type == "cuda" else torch.float32
        model = load_model(checkpoint, device=target, dtype=dtype)
        return cls(model, clip_skip=clip_skip, device=target)

    # ------------------------------------------------------------------ LoRA merging
    def layers(self) -> dict[str, nn.Linear | nn.Conv2d]:
        """``lora_unet_<path>`` / ``lora_te_<path>`` -> layer, for every Linear and Conv2d (kohya's names)."""
        if self._layers is None:
            from torch import nn

            from ..networks.lora_format import FAMILIES, UNET_PREFIX

            named: dict[str, nn.Linear | nn.Conv2d] = {}
            prefixes = FAMILIES[self.model.family].text_encoder_prefixes
            models = [(UNET_PREFIX, self.model.unet), *zip(prefixes, self.model.text_encoders, strict=True)]
            for prefix, module in models:
                for path, layer in module.named_modules():
                    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                        continue
                    if prefix != UNET_PREFIX and not path.startswith("text_model."):
                        path = f"text_model.{path}"  # transformers 5 dropped the wrapper; files keep 4.x names
                    named[f"{prefix}_{path.replace('.', '_')}"] = layer
            self._layers = named
        return self._layers

    def _load_lora(self, path: Path) -> dict[str, dict[str, torch.Tensor]]:
        import torch

        from ..networks.lora_format import read_lora
        from ..networks.weights import layer_kind, weight_update

        tensors, meta = read_lora(path)
        groups: dict[str, dict[str, Any]] = {}
        for key, tensor in tensors.items():
            name, _, part = key.partition(".")
            groups.setdefault(name, {})[part] = tensor
        self._check_family(path, meta, groups)
        layers = self.layers()
        out: dict[str, dict[str, torch.Tensor]] = {}
        unmatched = 0
        for name, parts in groups.items():
            layer = layers.get(name)
            if layer is None or layer_kind(parts) is None:
                unmatched += 1
                continue
            try:
                weight_update(parts, layer.weight, 1.0)
            except (ValueError, RuntimeError):
                raise UserError(
                    f"{path.name} does not fit this checkpoint (layer {name} has another size); "
                    "preview a LoRA with the checkpoint it was trained on."
                ) from None
            out[name] = {part: t.to(layer.weight.device, torch.float32) for part, t in parts.items()}
        if not out:
            raise UserError(
                f"No layer of {path.name} fits {self.model.path.name}; it was trained for another kind "
                "of model (SD1, SD2 or SDXL): preview it with the checkpoint it was trained on."
            )
        if unmatched:
            log.warning(
                "%d layer(s) of %s do not fit %s and are left out of the previews.",
                unmatched,
                path.name,
                self.model.path.name,
            )
        return out

    def _check_family(self, path: Path, meta: dict[str, str], names: Iterable[str]) -> None:
        """Refuse a LoRA of the other kind (SDXL vs SD1/SD2) before merging: the tiny and some real layers have
        the same shapes in both, so a wrong file would otherwise be merged in part, silently."""
        from ..networks.lora_format import FAMILIES

        own = set(FAMILIES[self.model.family].text_encoder_prefixes)
        foreign = {m.group(1) for n in names if (m := _TE_PREFIX.match(n)) and m.group(1) not in own}
        version = str(meta.get("ss_base_model_version", "")).strip().lower()
        if foreign or (version and version.startswith("sdxl") != self.is_sdxl):
            kind = "SDXL" if self.is_sdxl else "SD1/SD2"
            raise UserError(
                f"{path.name} was trained for another kind of model than {self.model.path.name} "
                f"({kind}): preview it with the checkpoint it was trained on."
            )

    def apply_lora(self, lora: Path | None, weight: float) -> None:
        """Make the model's weights base + ``lora`` at ``weight`` (None or 0: the base model exactly)."""
        import torch

        from ..networks.weights import weight_update

        lora = Path(lora) if lora is not None else None
        weight = float(weight)
        if lora is None or weight == 0.0:
            lora, weight = None, 0.0
        if self._applied == (lora, weight):
            return
        layers = self.layers()
        with torch.no_grad():
            for name, original in self._originals.items():
                layers[name].weight.copy_(original)
            self._applied = (None, 0.0)
            if lora is None:
                return
            if lora != self._lora_path:
                self._lora, self._lora_path = self._load_lora(lora), lora
            for name, parts in self._lora.items():
                target = layers[name].weight
                if name not in self._originals:
                    self._originals[name] = target.detach().clone()
                original = self._originals[name].float()
                target.copy_(original + weight_update(parts, original, weight))
        self._applied = (lora, weight)

    # ------------------------------------------------------------------ pictures
    def encode(self, prompts: list[str]) -> Conditioning:
        """The UNet's text conditioning for ``prompts``, all padded to the same number of 77-token chunks.

        The trainer's recipe (``Trainer.encode_text``): SD1 with clip skip, SD2 as is; SDXL both encoders'
        penultimate layers side by side and the second's pooled projection of the first chunk.
        """
        import torch

        from ..models.text_encoding import Conditioning, encode_ids, token_rows

        ids = [
            [tok(p, add_special_tokens=False, truncation=False)["input_ids"] for p in prompts]
            for tok in self.model.tokenizers
        ]
        chunks = max(1, *(math.ceil(len(i) / 75) for per_tok in ids for i in per_tok))
        clip_skip = self.clip_skip if self.model.family == "sd1" else 1
        hidden: list[torch.Tensor] = []
        pooled: torch.Tensor | None = None
        with torch.no_grad():
            for te, tok, tok_ids in zip(self.model.text_encoders, self.model.tokenizers, ids, strict=True):
                tokens = token_rows(tok, tok_ids, chunks).to(self.device)
                h, p = encode_ids(te, tokens, sdxl=self.is_sdxl, clip_skip=clip_skip)
                hidden.append(h)
                pooled = p if p is not None else pooled
        return Conditioning(torch.cat(hidden, dim=-1), pooled)

    def generate(self, settings: PreviewSettings, lora: Path | None, weight: float) -> Image.Image:
        import torch

        if settings.seed < 0:
            settings = settings.with_fixed_seed()
        if settings.sampler != self._sampler:
            self.pipe.scheduler = scheduler_for(settings.sampler, self.model.noise_scheduler.config)
            self._sampler = settings.sampler
        self.apply_lora(lora, weight)
        prompt = _EXTRA_NETWORK_TAG.sub("", settings.prompt).strip()
        if prompt != settings.prompt.strip():
            log.info("Extra-network tags in the preview prompt are ignored; the LoRA is applied by the previewer.")
        cond = self.encode([prompt, settings.negative_prompt])
        generator = torch.Generator("cpu").manual_seed(int(settings.seed))
        args: dict[str, Any] = {
            "prompt_embeds": cond.hidden[:1],
            "negative_prompt_embeds": cond.hidden[1:],
            "num_inference_steps": settings.steps,
            "guidance_scale": settings.cfg_scale,
            "width": settings.width,
            "height": settings.height,
            "generator": generator,
            "output_type": "latent",
        }
        if self.is_sdxl:
            args.update(self._sdxl_args(cond, settings))
        return self.decode(self.pipe(**args).images)

    def _sdxl_args(self, cond: Conditioning, settings: PreviewSettings) -> dict[str, Any]:
        """SDXL's extra pipeline inputs: the pooled embeddings and the size conditioning of an uncropped
        picture of the asked size (as ``trainer.sdxl_time_ids`` and the WebUI make it)."""
        import torch

        if cond.pooled is None:
            raise UserError(
                f"The second text encoder of {self.model.path.name} gave no pooled output; "
                "use a standard SDXL checkpoint."
            )
        negative_hidden, negative_pooled = cond.hidden[1:], cond.pooled[1:]
        if not settings.negative_prompt.strip():
            # An empty negative prompt is no text at all for SDXL, as in the WebUI and diffusers.
            negative_hidden, negative_pooled = torch.zeros_like(negative_hidden), torch.zeros_like(negative_pooled)
        size = (settings.height, settings.width)
        return {
            "negative_prompt_embeds": negative_hidden,
            "pooled_prompt_embeds": cond.pooled[:1],
            "negative_pooled_prompt_embeds": negative_pooled,
            "original_size": size,
            "crops_coords_top_left": (0, 0),
            "target_size": size,
        }

    def decode(self, latents: torch.Tensor) -> Image.Image:
        """The first picture of ``latents`` through the float32 VAE."""
        import torch

        vae = self.model.vae
        with torch.no_grad():
            scaled = latents[:1].to(self.device, torch.float32) / vae.config.scaling_factor
            image = vae.decode(scaled, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pil")[0].convert("RGB")

    def close(self) -> None:
        """Give the memory back (the UI makes a previewer per grid)."""
        import torch

        self._originals.clear()
        self._lora.clear()
        self._layers = None
        self.pipe = None
        self.model = None  # type: ignore[assignment]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> DiffusersPreviewer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
