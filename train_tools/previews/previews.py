"""Preview pictures of a run's LoRA files: a grid of epochs x weights, to pick the best epoch without guessing.

The grid has one row per saved LoRA file (epoch) and one column per LoRA weight, plus a "no LoRA" column;
every cell uses the same seed, so only the LoRA differs between cells. It is written beside the run::

    <run>/previews/grid-<timestamp>.png          the labelled grid
    <run>/previews/grid-<timestamp>/grid.json    what each cell is (epoch, file, weight, picture) and where
    <run>/previews/grid-<timestamp>/*.png        each cell on its own (the Lora card's picture on install)

The pictures come from a ``Previewer``: in the WebUI its own txt2img with ``<lora:name:weight>`` in the prompt
(``webui_host.WebuiPreviewer``), standalone ``DiffusersPreviewer``, the run's checkpoint in diffusers with the
LoRA merged into the weights by our own code as ``W + up @ down * alpha / rank * weight`` (the WebUI's formula),
so it needs neither peft nor diffusers' LoRA loader and works on every diffusers version the hosts ship.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import random
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from PIL import Image, ImageDraw, ImageFont

from .. import fileio
from ..fileio import read_json
from ..config import TrainConfig
from ..errors import UserError
from ..progress import Reporter, StepInfo, StopFlag, TerminalReporter

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..models.loader import LoadedModel
    from ..store import Version
    from ..training.text_encoding import Conditioning

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2)
DEFAULT_NEGATIVE_PROMPT = "lowres, bad anatomy, bad hands, worst quality, low quality, blurry"
DEFAULT_SAMPLER = "Euler a"
#: The samplers the standalone previewer has, under the WebUI's names (the WebUI takes any of its own).
SAMPLERS: tuple[str, ...] = ("Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "UniPC", "Heun")
BASE_LABEL = "no LoRA"
PREVIEWS_DIR = "previews"
SAMPLES_DIR = "samples"
GRID_JSON = "grid.json"
SAMPLES_PER_EPOCH = 2

# WebUI extra-network tags; the standalone previewer applies the LoRA itself, so typed tags are dropped.
_EXTRA_NETWORK_TAG = re.compile(r"<(?:lora|lyco|hypernet):[^>]*>", re.IGNORECASE)
_EPOCH_IN_NAME = re.compile(r"-(\d{6})(?:-interrupted)?$")
# The text-encoder part of a kohya key: lora_te (SD1/SD2) or lora_te1 / lora_te2 (SDXL).
_TE_PREFIX = re.compile(r"^(lora_te\d?)_")


# ====================================================================== settings
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
        return dataclasses.replace(self, prompt=str(self.prompt or ""), negative_prompt=str(self.negative_prompt or ""),
                                   seed=seed, steps=steps, cfg_scale=cfg, sampler=str(self.sampler or DEFAULT_SAMPLER),
                                   width=width, height=height, weights=weights)

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
    settings = PreviewSettings(prompt=config.preview_prompt.strip() or trigger_word(config, project),
                               width=side, height=side)
    return dataclasses.replace(settings, **changes).validated() if changes else settings


# ====================================================================== a run's files
@dataclass(frozen=True)
class RunFile:
    """One LoRA file of a run: a row of the grid."""

    path: Path
    epoch: int
    label: str


def run_config(run_dir: Path) -> TrainConfig:
    """The settings a run was trained with (its own snapshot; keys this version does not know are skipped)."""
    path = Path(run_dir) / "settings.json"
    try:
        data = read_json(path, "train a new run to preview", what="The run's settings file")
    except FileNotFoundError:
        return TrainConfig()
    if not isinstance(data, dict):
        raise UserError(f"The run's settings file {path} is not a table of settings; train a new run to preview.")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig.from_dict({k: v for k, v in data.items() if k in known})


def run_checkpoint(run_dir: Path) -> Path | None:
    """The base checkpoint a run recorded, if that file still exists."""
    try:
        data = read_json(Path(run_dir) / "settings.json", "choose the base model")
    except (OSError, UserError):
        return None
    recorded = data.get("base_model_path") if isinstance(data, dict) else None
    if isinstance(recorded, str) and recorded and Path(recorded).is_file():
        return Path(recorded)
    return None


def choose_run(version: Version, run: str | None = None) -> Path:
    """A run folder of ``version`` by name, or its newest run."""
    runs = version.runs()
    if not runs:
        raise UserError(f"Version '{version.name}' of '{version.project}' has no training runs yet; train first.")
    if not run:
        return runs[-1]
    for path in runs:
        if path.name == run:
            return path
    raise UserError(f"Version '{version.name}' has no run '{run}'; its runs are: "
                    f"{', '.join(p.name for p in runs)}.")


def run_lora_files(run_dir: Path) -> list[RunFile]:
    """The run's LoRA files in epoch order (epoch from the file's ``ss_epoch``, else from its name)."""
    files = []
    for path in sorted(Path(run_dir).glob("*.safetensors")):
        if path.name.startswith("."):
            continue
        epoch = _file_epoch(path)
        label = f"epoch {epoch}" + (" (stopped)" if "interrupted" in path.stem else "")
        files.append(RunFile(path, epoch, label))
    if not files:
        raise UserError(f"The run {Path(run_dir).name} has no LoRA files to preview; train (longer) first.")
    return sorted(files, key=lambda f: (f.epoch, f.path.name))


def _file_epoch(path: Path) -> int:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            value = (fh.metadata() or {}).get("ss_epoch")
        if value is not None:
            return int(value)
    except (OSError, ValueError, SafetensorError):
        pass
    match = _EPOCH_IN_NAME.search(path.stem)
    return int(match.group(1)) if match else 0


# ====================================================================== previewers
@runtime_checkable
class Previewer(Protocol):
    """Makes one picture: ``lora`` None (or weight 0 in the standalone one) means the base model alone."""

    def generate(self, settings: PreviewSettings, lora: Path | None, weight: float) -> Image.Image:
        ...

    def close(self) -> None:
        ...


def make_previewer(host: Any, checkpoint: Path, *, clip_skip: int = 1, device: str | None = None) -> Previewer:
    """The host's own previewer when it has one (the WebUI's txt2img), else diffusers on ``checkpoint``."""
    factory = getattr(host, "make_previewer", None)
    if callable(factory):
        return factory(checkpoint, clip_skip=clip_skip)
    if device is None and host is not None and callable(getattr(host, "device", None)):
        device = host.device()
    return DiffusersPreviewer.from_checkpoint(checkpoint, clip_skip=clip_skip, device=device)


def _scheduler_for(name: str, base_config: Any) -> Any:
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
        "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                            "use_karras_sigmas": True}),
        "DDIM": ("DDIMScheduler", {"timestep_spacing": "leading", "set_alpha_to_one": False}),
        "UniPC": ("UniPCMultistepScheduler", {}),
        "Heun": ("HeunDiscreteScheduler", {}),
    }
    if name not in table:
        raise UserError(f"The sampler '{name}' is not available outside the WebUI; choose one of "
                        f"{', '.join(SAMPLERS)}.")
    cls_name, extra = table[name]
    config.update(extra)
    return getattr(diffusers, cls_name).from_config(config)


def _sd_pipeline(model: LoadedModel) -> Any:
    """SD1/SD2's pipeline on our modules; no safety checker (the pictures are the user's own LoRA)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], unet=model.unet,
        scheduler=_scheduler_for(DEFAULT_SAMPLER, model.noise_scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def _sdxl_pipeline(model: LoadedModel) -> Any:
    """SDXL's pipeline on our modules; its size conditioning (``add_time_ids``) is what the pictures need, the
    prompt is encoded by ``DiffusersPreviewer.encode``. No watermark: it needs a package the hosts lack."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=model.vae, text_encoder=model.text_encoders[0], text_encoder_2=model.text_encoders[1],
        tokenizer=model.tokenizers[0], tokenizer_2=model.tokenizers[1], unet=model.unet,
        scheduler=_scheduler_for(DEFAULT_SAMPLER, model.noise_scheduler.config), add_watermarker=False)


@dataclass
class _LoraLayer:
    down: Any  # torch.Tensor, float32 on the layer's device
    up: Any
    scale: float  # alpha / rank


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
            raise UserError(f"Previews of {model.family.upper()} checkpoints are not supported outside the WebUI; "
                            "use an SD1, SD2 or SDXL checkpoint.")
        self.model = model
        self.clip_skip = int(clip_skip)
        self.device = torch.device(device) if device is not None else next(model.unet.parameters()).device
        self.is_sdxl = len(model.text_encoders) == 2
        if model.vae.dtype != torch.float32:
            model.vae.float()  # it only decodes here; the previewer owns this copy of the model
        self.pipe = _sdxl_pipeline(model) if self.is_sdxl else _sd_pipeline(model)
        self.pipe.set_progress_bar_config(disable=True)
        self._sampler = DEFAULT_SAMPLER
        self._layers: dict[str, nn.Module] | None = None
        self._originals: dict[str, torch.Tensor] = {}
        self._lora_path: Path | None = None
        self._lora: dict[str, _LoraLayer] = {}
        self._applied: tuple[Path | None, float] = (None, 0.0)

    @classmethod
    def from_checkpoint(cls, checkpoint: Path, *, clip_skip: int = 1, device: str | None = None,
                        dtype: torch.dtype | None = None) -> DiffusersPreviewer:
        """Load ``checkpoint`` for previews: on the GPU in fp16 when there is one, else on the CPU in fp32."""
        import torch

        from ..models.loader import load_model

        target = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.float16 if target.type == "cuda" else torch.float32
        model = load_model(checkpoint, device=target, dtype=dtype)
        return cls(model, clip_skip=clip_skip, device=target)

    # ------------------------------------------------------------------ LoRA merging
    def layers(self) -> dict[str, nn.Module]:
        """``lora_unet_<path>`` / ``lora_te_<path>`` -> layer, for every Linear and Conv2d (kohya's names)."""
        if self._layers is None:
            from torch import nn

            from ..networks.lora_format import FAMILIES, UNET_PREFIX

            named: dict[str, nn.Module] = {}
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

    def _load_lora(self, path: Path) -> dict[str, _LoraLayer]:
        import torch

        from ..networks.lora_format import read_lora

        tensors, meta = read_lora(path)
        groups: dict[str, dict[str, Any]] = {}
        for key, tensor in tensors.items():
            name, _, part = key.partition(".")
            groups.setdefault(name, {})[part] = tensor
        self._check_family(path, meta, groups)
        layers = self.layers()
        out: dict[str, _LoraLayer] = {}
        unmatched = 0
        for name, parts in groups.items():
            layer = layers.get(name)
            if layer is None or "lora_down.weight" not in parts or "lora_up.weight" not in parts:
                unmatched += 1
                continue
            down, up = parts["lora_down.weight"], parts["lora_up.weight"]
            rank = down.shape[0]
            alpha = float(parts["alpha"].item()) if "alpha" in parts else float(rank)
            if _delta_numel(down, up) != layer.weight.numel():
                raise UserError(f"{path.name} does not fit this checkpoint (layer {name} has another size); "
                                "preview a LoRA with the checkpoint it was trained on.")
            device = layer.weight.device
            out[name] = _LoraLayer(down.to(device, torch.float32), up.to(device, torch.float32), alpha / rank)
        if not out:
            raise UserError(f"No layer of {path.name} fits {self.model.path.name}; it was trained for another kind "
                            "of model (SD1, SD2 or SDXL): preview it with the checkpoint it was trained on.")
        if unmatched:
            log.warning("%d layer(s) of %s do not fit %s and are left out of the previews.", unmatched, path.name,
                        self.model.path.name)
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
            raise UserError(f"{path.name} was trained for another kind of model than {self.model.path.name} "
                            f"({kind}): preview it with the checkpoint it was trained on.")

    def apply_lora(self, lora: Path | None, weight: float) -> None:
        """Make the model's weights base + ``lora`` at ``weight`` (None or 0: the base model exactly)."""
        import torch

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
            for name, part in self._lora.items():
                target = layers[name].weight
                if name not in self._originals:
                    self._originals[name] = target.detach().clone()
                delta = _lora_delta(part.down, part.up) * (part.scale * weight)
                target.copy_(self._originals[name].float() + delta.reshape(target.shape))
        self._applied = (lora, weight)

    # ------------------------------------------------------------------ pictures
    def encode(self, prompts: list[str]) -> Conditioning:
        """The UNet's text conditioning for ``prompts``, all padded to the same number of 77-token chunks.

        The trainer's recipe (``Trainer.encode_text``): SD1 with clip skip, SD2 as is; SDXL both encoders'
        penultimate layers side by side and the second's pooled projection of the first chunk.
        """
        import torch

        from ..training.text_encoding import Conditioning, encode_ids, token_rows

        ids = [[tok(p, add_special_tokens=False, truncation=False)["input_ids"] for p in prompts]
               for tok in self.model.tokenizers]
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
            self.pipe.scheduler = _scheduler_for(settings.sampler, self.model.noise_scheduler.config)
            self._sampler = settings.sampler
        self.apply_lora(lora, weight)
        prompt = _EXTRA_NETWORK_TAG.sub("", settings.prompt).strip()
        if prompt != settings.prompt.strip():
            log.info("Extra-network tags in the preview prompt are ignored; the LoRA is applied by the previewer.")
        cond = self.encode([prompt, settings.negative_prompt])
        generator = torch.Generator("cpu").manual_seed(int(settings.seed))
        args: dict[str, Any] = {
            "prompt_embeds": cond.hidden[:1], "negative_prompt_embeds": cond.hidden[1:],
            "num_inference_steps": settings.steps, "guidance_scale": settings.cfg_scale,
            "width": settings.width, "height": settings.height, "generator": generator, "output_type": "latent"}
        if self.is_sdxl:
            args.update(self._sdxl_args(cond, settings))
        return self.decode(self.pipe(**args).images)

    def _sdxl_args(self, cond: Conditioning, settings: PreviewSettings) -> dict[str, Any]:
        """SDXL's extra pipeline inputs: the pooled embeddings and the size conditioning of an uncropped
        picture of the asked size (as ``trainer.sdxl_time_ids`` and the WebUI make it)."""
        import torch

        if cond.pooled is None:
            raise UserError(f"The second text encoder of {self.model.path.name} gave no pooled output; "
                            "use a standard SDXL checkpoint.")
        negative_hidden, negative_pooled = cond.hidden[1:], cond.pooled[1:]
        if not settings.negative_prompt.strip():
            # An empty negative prompt is no text at all for SDXL, as in the WebUI and diffusers.
            negative_hidden, negative_pooled = torch.zeros_like(negative_hidden), torch.zeros_like(negative_pooled)
        size = (settings.height, settings.width)
        return {"negative_prompt_embeds": negative_hidden, "pooled_prompt_embeds": cond.pooled[:1],
                "negative_pooled_prompt_embeds": negative_pooled, "original_size": size,
                "crops_coords_top_left": (0, 0), "target_size": size}

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
        self.pipe = None  # type: ignore[assignment]
        self.model = None  # type: ignore[assignment]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> DiffusersPreviewer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _delta_numel(down: Any, up: Any) -> int:
    inner = 1
    for side in down.shape[1:]:
        inner *= int(side)
    return int(up.shape[0]) * inner


def _lora_delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``up @ down`` (float32); a conv's ``down`` keeps its kernel, its ``up`` is 1x1."""
    if down.dim() == 4:
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    return up.flatten(1) @ down


# ====================================================================== the grid
@dataclass
class GridCell:
    """One picture of a grid. ``file``/``weight`` are None in the "no LoRA" column."""

    row: int
    col: int
    epoch: int
    file: Path | None
    weight: float | None
    image: Path

    @property
    def has_lora(self) -> bool:
        return self.file is not None and self.weight is not None


@dataclass
class GridInfo:
    """A written grid, as ``grid.json`` describes it; the UI maps clicks on the picture to cells with it."""

    json_path: Path
    image: Path
    settings: PreviewSettings
    columns: list[str]
    rows: list[str]
    left: int
    top: int
    cell_width: int
    cell_height: int
    cells: list[GridCell] = field(default_factory=list)
    interrupted: bool = False

    @classmethod
    def load(cls, json_path: Path) -> GridInfo:
        json_path = Path(json_path)
        data = read_json(json_path, "make the previews again", what="The preview grid description")
        folder = json_path.parent
        run_dir = folder.parent.parent
        try:  # a hand-edited or damaged description: a sentence, and no path that leads out of the run
            cells = [GridCell(row=int(c["row"]), col=int(c["col"]), epoch=int(c["epoch"]),
                              file=run_dir / _plain_name(c["file"]) if c.get("file") else None,
                              weight=c.get("weight"), image=folder / _plain_name(c["path"])) for c in data["cells"]]
            layout = data["layout"]
            return cls(json_path=json_path, image=folder.parent / _plain_name(data["grid"]),
                       settings=PreviewSettings.from_dict(data["settings"]), columns=list(layout["columns"]),
                       rows=list(layout["rows"]), left=int(layout["left"]), top=int(layout["top"]),
                       cell_width=max(1, int(layout["cell_width"])), cell_height=max(1, int(layout["cell_height"])),
                       cells=cells, interrupted=bool(data.get("interrupted", False)))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise UserError(f"The preview grid description {json_path} is damaged ({type(exc).__name__}); make the "
                            "previews again.") from None

    def cell(self, row: int, col: int) -> GridCell | None:
        return next((c for c in self.cells if c.row == row and c.col == col), None)

    def cell_at(self, x: float, y: float) -> GridCell | None:
        """The cell under pixel (x, y) of the grid picture (a click), or None on a label or a gap."""
        col = math.floor((x - self.left) / self.cell_width)
        row = math.floor((y - self.top) / self.cell_height)
        if x < self.left or y < self.top or col >= len(self.columns) or row >= len(self.rows):
            return None
        return self.cell(row, col)


def _plain_name(name: Any) -> str:
    """A file name inside the folder it is read from (what grid.json holds); ValueError for anything else."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"{name!r} is not a plain file name")
    return name


def generate_grid(run_dir: Path, previewer: Previewer, settings: PreviewSettings, *,
                  files: Sequence[RunFile] | None = None, include_base: bool = True,
                  reporter: Reporter | None = None, stop: StopFlag | None = None,
                  report_steps: bool = True) -> Path:
    """Make the epochs x weights grid of ``run_dir`` and return the grid picture's path.

    Progress goes to ``reporter`` (a message per picture and, with ``report_steps``, a StepInfo whose step
    counts pictures; pass False where the reporter's steps are a training's); ``stop`` ends it after the
    current picture, and what was made is still written (``grid.json`` says ``interrupted``).
    """
    run_dir = Path(run_dir)
    settings = settings.validated().with_fixed_seed()
    rows = list(files) if files is not None else run_lora_files(run_dir)
    if not rows:
        raise UserError("There are no LoRA files to preview.")
    reporter = reporter or Reporter()
    stop = stop or StopFlag()
    columns = ([BASE_LABEL] if include_base else []) + [_weight_label(w) for w in settings.weights]
    weights: list[float | None] = ([None] if include_base else []) + list(settings.weights)
    folder, grid_path = _new_grid_paths(run_dir)
    total = len(rows) * len(settings.weights) + (1 if include_base else 0)
    reporter.start(total, len(rows))
    done, t0 = 0, time.perf_counter()
    pictures: dict[tuple[int, int], Image.Image] = {}
    cells: list[GridCell] = []
    base: tuple[Image.Image, Path] | None = None
    interrupted = False
    for r, run_file in enumerate(rows):
        for c, weight in enumerate(weights):
            if weight is None and base is not None:
                image, path = base  # the base model's picture is the same in every row: made once
            else:
                if stop.requested:
                    interrupted = True
                    break
                what = BASE_LABEL if weight is None else f"{run_file.label}, weight {_weight_label(weight)}"
                reporter.message(f"Preview {done + 1}/{total}: {what}")
                image = previewer.generate(settings, None if weight is None else run_file.path,
                                           0.0 if weight is None else weight)
                name = "base.png" if weight is None else f"r{r:03d}-e{run_file.epoch:06d}-w{_weight_label(weight)}.png"
                path = folder / name
                fileio.write_bytes(path, png_bytes(image))
                if weight is None:
                    base = (image, path)
                done += 1
                if report_steps:
                    reporter.step(_picture_step(done, total, r + 1, len(rows), t0))
            pictures[(r, c)] = image
            cells.append(GridCell(r, c, run_file.epoch, None if weight is None else run_file.path, weight, path))
        if interrupted:
            break
    grid, layout = draw_grid(pictures, [f.label for f in rows], columns, settings.width, settings.height)
    fileio.write_bytes(grid_path, png_bytes(grid))
    fileio.write_json(folder / GRID_JSON, {
        "grid": grid_path.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "settings": settings.to_dict(),
        "interrupted": interrupted,
        "layout": layout,
        "cells": [{"row": cell.row, "col": cell.col, "epoch": cell.epoch,
                   "file": cell.file.relative_to(run_dir).as_posix() if cell.file else None,
                   "weight": cell.weight, "path": cell.image.name} for cell in cells],
    })
    reporter.message(("Previews stopped; " if interrupted else "Previews done: ") + f"{done} picture(s) in "
                     f"{grid_path.name}")
    reporter.finish()
    log.info("Preview grid: %s", grid_path)
    return grid_path


class PictureBarReporter(TerminalReporter):
    """The terminal bar of ``generate_grid``, counting pictures (the command line's ``preview``)."""

    def start(self, total_steps: int, total_epochs: int) -> None:
        from tqdm.auto import tqdm

        log.info("Making %d preview picture(s) for %d LoRA file(s)", total_steps, total_epochs)
        self._bar = tqdm(total=total_steps, unit="picture", dynamic_ncols=True)

    def step(self, info: StepInfo) -> None:
        if self._bar is not None:
            self._bar.n = info.step
            self._bar.refresh()

    def message(self, text: str) -> None:
        if self._bar is None:
            super().message(text)
        elif not text.startswith("Preview "):  # the bar already counts the pictures
            self._bar.write(text)


def _picture_step(done: int, total: int, row: int, rows: int, t0: float) -> StepInfo:
    elapsed = time.perf_counter() - t0
    speed = done / elapsed if elapsed > 0 else 0.0
    return StepInfo(step=done, total_steps=total, epoch=row, total_epochs=rows, loss=0.0, avg_loss=0.0, lr=0.0,
                    steps_per_s=speed, eta_s=(total - done) / speed if speed else 0.0)


def _weight_label(weight: float) -> str:
    return f"{weight:g}"


def _new_grid_paths(run_dir: Path) -> tuple[Path, Path]:
    """``(cells folder, grid picture)`` named by the time, suffixed when a grid of that second exists."""
    previews = run_dir / PREVIEWS_DIR
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, n = f"grid-{stamp}", 1
    while (previews / name).exists() or (previews / f"{name}.png").exists():
        name, n = f"grid-{stamp}-{n}", n + 1
    folder = previews / name
    folder.mkdir(parents=True)
    return folder, previews / f"{name}.png"


def grid_info_for(grid_png: Path) -> GridInfo:
    """The description of the grid picture ``grid_png`` (as ``generate_grid`` returned it)."""
    grid_png = Path(grid_png)
    return GridInfo.load(grid_png.with_suffix("") / GRID_JSON)


def latest_grid(run_dir: Path) -> GridInfo | None:
    """The newest grid of a run, or None."""
    folder = Path(run_dir) / PREVIEWS_DIR
    found = sorted(folder.glob(f"grid-*/{GRID_JSON}"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return GridInfo.load(found[-1]) if found else None


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def draw_grid(pictures: dict[tuple[int, int], Image.Image], row_labels: Sequence[str], column_labels: Sequence[str],
              cell_width: int, cell_height: int) -> tuple[Image.Image, dict[str, Any]]:
    """The labelled grid (Pillow's default font) and its layout; cells not made are left grey."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        box = probe.textbbox((0, 0), text, font=font)
        return box[2] - box[0], box[3] - box[1]

    pad = 6
    left = max((size(t)[0] for t in row_labels), default=0) + 2 * pad
    top = max((size(t)[1] for t in column_labels), default=0) + 2 * pad
    grid = Image.new("RGB", (left + cell_width * len(column_labels), top + cell_height * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(column_labels):
        w, _ = size(text)
        draw.text((left + c * cell_width + (cell_width - w) // 2, pad), text, fill="black", font=font)
    for r, text in enumerate(row_labels):
        _, h = size(text)
        draw.text((pad, top + r * cell_height + (cell_height - h) // 2), text, fill="black", font=font)
        for c in range(len(column_labels)):
            box = (left + c * cell_width, top + r * cell_height)
            picture = pictures.get((r, c))
            if picture is None:
                draw.rectangle([box, (box[0] + cell_width - 1, box[1] + cell_height - 1)], fill=(200, 200, 200))
            else:
                if picture.size != (cell_width, cell_height):
                    picture = picture.resize((cell_width, cell_height))
                grid.paste(picture.convert("RGB"), box)
    layout = {"left": left, "top": top, "cell_width": cell_width, "cell_height": cell_height,
              "columns": list(column_labels), "rows": list(row_labels)}
    return grid, layout


# ====================================================================== installing, training-time hooks
def install_cell(cell: GridCell, lora_dir: Path, *, activation_text: str, overwrite: bool = False,
                 name: str | None = None) -> Path:
    """Install the LoRA file of a clicked cell with the cell's picture and weight (``lora_install``)."""
    from ..networks.install import install_lora

    if not cell.has_lora or cell.file is None or cell.weight is None:
        raise UserError("That picture is the model without a LoRA; click a picture in one of the weight columns.")
    return install_lora(cell.file, lora_dir, weight=cell.weight, activation_text=activation_text,
                        preview=cell.image, overwrite=overwrite, name=name)


def find_cell(run_dir: Path, lora_file: Path, weight: float | None = None) -> GridCell | None:
    """In the run's newest grid, the cell of ``lora_file`` at ``weight`` (else its closest weight)."""
    info = latest_grid(run_dir)
    if info is None:
        return None
    cells = [c for c in info.cells if c.file is not None and c.file.resolve() == Path(lora_file).resolve()
             and c.weight is not None]
    if not cells:
        return None
    target = 1.0 if weight is None else float(weight)
    return min(cells, key=lambda c: (abs(float(c.weight or 0.0) - target), -float(c.weight or 0.0)))


def should_sample(config: TrainConfig, epoch: int) -> bool:
    """Whether the trainer makes samples after ``epoch`` (``sample_every_n_epochs``; 0 = never)."""
    every = int(config.sample_every_n_epochs)
    return every > 0 and epoch > 0 and epoch % every == 0


def sample_epoch(run_dir: Path, lora_file: Path, epoch: int, previewer: Previewer, settings: PreviewSettings,
                 *, count: int = SAMPLES_PER_EPOCH, weight: float = 1.0) -> list[Path]:
    """A few pictures of ``lora_file`` at ``weight`` (seeds seed, seed+1, ...) in ``<run>/samples/``."""
    settings = settings.validated().with_fixed_seed()
    out = []
    for i in range(count):
        image = previewer.generate(dataclasses.replace(settings, seed=settings.seed + i), lora_file, weight)
        path = Path(run_dir) / SAMPLES_DIR / f"epoch-{epoch:06d}-{i + 1}.png"
        fileio.write_bytes(path, png_bytes(image))
        out.append(path)
    return out


def previews_at_end(run_dir: Path, config: TrainConfig, project: str, previewer: Previewer, *,
                    reporter: Reporter | None = None, stop: StopFlag | None = None) -> Path | None:
    """The grid a finished training makes when ``preview_at_end`` is on (None when it is off)."""
    if not config.preview_at_end:
        return None
    return generate_grid(run_dir, previewer, default_settings(config, project), reporter=reporter, stop=stop,
                         report_steps=False)
