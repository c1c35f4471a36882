"""Pretrain the tiny SD1 demo model on the shapes world, so that its pictures show what its prompts ask for.

``python -m train_tools demo-model pretrain`` runs this. Three parts, all from one seed, bit for bit the same
on one CPU:

1. the VAE learns to reconstruct 64x64 pictures of the world (MSE plus a small KL), then its latent space is
   rescaled (exactly, in its 1x1 ``quant_conv``/``post_quant_conv``) so that latents times the SD1 scaling
   factor 0.18215 have zero mean and unit spread, as the diffusion schedule expects;
2. the pictures' latents are cached (the posterior's mean and spread, sampled per step as the LoRA trainer does);
3. the UNet and the CLIP text encoder learn together, end to end, from the epsilon-prediction loss of the SD1
   schedule (DDPM, scaled_linear 0.00085..0.012, 1000 steps): only the UNet's loss knows what the text must
   carry, and the tiny encoder is cheap to train with it. 10% of the captions are empty, so that classifier-
   free guidance works; half the batches read the text through clip skip 2 (the SD1 training default) and half
   through the last layer (the previewer's default), so both give the model's pictures. Half the captions get
   one to three random tokens and a comma in front (never the world's words, never the shapes it keeps for
   LoRAs to teach): a LoRA's trigger word goes first in every caption, and the model must draw the rest of
   the prompt as if it were not there. The loss is weighted by min-SNR (gamma 5), which spends the tiny
   model's capacity on the noisy steps that decide a picture's shape. The saved weights are an exponential
   moving average of the trained ones.

The result is written through the same conversion as every demo checkpoint: the WebUI's single-file layout.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from ..data.shapes_world import NEW_SHAPES, SIZE, to_array, world_pictures
from ..demo_settings import DEMO_MARKER
from ..models.configs import build_scheduler, build_text_encoders, build_unet, build_vae, spec
from ..models.demo_model import save_single_file
from ..models.text_encoding import encode_ids, token_rows
from ..models.tokenizers import tiny_tokenizer
from ..progress import Reporter, StepInfo, StopFlag

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainSettings:
    """What the pretraining does (the time and the checker's scores of these defaults: BENCHMARKS.md)."""

    seed: int = 0
    pictures: int = 6000  # rendered once; the UNet sees each about (unet_steps * unet_batch / pictures) times
    vae_steps: int = 4000
    vae_batch: int = 32
    vae_crop: int = 32  # the VAE is convolutional: it learns from 32x32 crops at a quarter of the cost
    vae_lr: float = 3e-3
    kl_weight: float = 1e-6
    unet_steps: int = 3000
    unet_batch: int = 64
    unet_lr: float = 3e-3
    warmup: float = 0.05  # of each stage's steps
    caption_dropout: float = 0.1
    prefix_rate: float = 0.5  # captions with random tokens in front (a stand-in for a LoRA's trigger word)
    snr_gamma: float = 5.0
    ema_decay: float = 0.995

    @property
    def total_steps(self) -> int:
        return self.vae_steps + self.unet_steps


class _Progress:
    """StepInfo for the reporter across both stages (the "epochs" of the bar are the two stages)."""

    def __init__(self, reporter: Reporter, total: int) -> None:
        self.reporter, self.total, self.done = reporter, total, 0
        self.start = time.perf_counter()
        self.avg: float | None = None

    def step(self, stage: int, loss: float, lr: float) -> None:
        self.done += 1
        self.avg = loss if self.avg is None else 0.95 * self.avg + 0.05 * loss
        elapsed = time.perf_counter() - self.start
        rate = self.done / max(elapsed, 1e-9)
        self.reporter.step(
            StepInfo(
                self.done, self.total, stage, 2, loss, self.avg, lr, rate, (self.total - self.done) / max(rate, 1e-9)
            )
        )


def _lr_at(step: int, settings: PretrainSettings, base: float, total: int) -> float:
    """Linear warm-up, then a cosine decay to a tenth."""
    warmup = max(1, round(settings.warmup * total))
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1.0 + torch.cos(torch.tensor(t * torch.pi)).item()))


def train_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    settings: PretrainSettings,
    rng: random.Random,
    generator: torch.Generator,
    progress: _Progress,
    stop: StopFlag,
) -> bool:
    """Reconstruction + ``kl_weight`` x KL on random batches of ``images``; False when stopped."""
    with torch.no_grad():
        # Start the posterior narrow (std e^-4): at the default std 1 the decoder sees mostly noise and learns
        # slowly, and the LoRA trainer samples its cached latents with this std.
        vae.quant_conv.bias[vae.config.latent_channels :] = -8.0
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    vae.train()
    for step in range(settings.vae_steps):
        if stop.requested:
            return False
        lr = _lr_at(step, settings, settings.vae_lr, settings.vae_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = images[rng.sample(range(len(images)), settings.vae_batch)]
        side = images.shape[-1]
        if settings.vae_crop < side:
            top, left = (rng.randrange(0, side - settings.vae_crop + 1, 8) for _ in range(2))
            batch = batch[:, :, top : top + settings.vae_crop, left : left + settings.vae_crop]
        posterior = vae.encode(batch).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(z).sample
        loss = F.mse_loss(reconstruction, batch) + settings.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.step(1, float(loss.detach()), lr)
    vae.eval()
    return True


@torch.no_grad()
def encode_all(vae: AutoencoderKL, images: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior mean and spread of every picture (unscaled latents)."""
    means, stds = [], []
    for part in images.split(chunk):
        posterior = vae.encode(part).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def normalise_latents(vae: AutoencoderKL, mean: torch.Tensor) -> None:
    """Rescale the VAE's latent space in place so that ``latent * scaling_factor`` has per-channel mean 0 and
    overall spread 1 on the pictures whose posterior means are ``mean``; decoding is unchanged.

    With z' = s (z - m): quant_conv's mean rows are scaled by s and shifted by -s m, its log-variance rows shifted
    by 2 log s; post_quant_conv reads z = z'/s + m, so its weights are divided by s and its bias gains W m.
    """
    factor = float(vae.config.scaling_factor)
    shift = mean.mean(dim=(0, 2, 3))
    s = 1.0 / (factor * float((mean - shift[None, :, None, None]).std()))
    channels = shift.numel()
    quant, post = vae.quant_conv, vae.post_quant_conv
    quant.weight[:channels] *= s
    quant.bias[:channels] = s * (quant.bias[:channels] - shift)
    quant.bias[channels:] += 2.0 * torch.log(torch.tensor(s))
    post.bias += post.weight[:, :, 0, 0] @ shift
    post.weight /= s


class _Ema:
    """An exponential moving average of some modules' parameters (warmed up: decay min(d, (1+n)/(10+n)))."""

    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.modules, self.decay, self.updates = modules, decay, 0
        self.shadow = [copy.deepcopy(m).requires_grad_(False) for m in modules]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for live, shadow in zip(self.modules, self.shadow, strict=True):
            for p, q in zip(live.parameters(), shadow.parameters(), strict=True):
                q.mul_(d).add_(p.detach(), alpha=1.0 - d)


def _prefix_pool(tokenizer: Any, caption_ids: Iterable[list[int]]) -> list[int]:
    """The token ids a caption's random prefix draws from: all but the special tokens, the comma, every token
    of the world's captions and of the shapes kept for LoRAs to teach (those stay unseen)."""
    kept = {i for ids in caption_ids for i in ids}
    for word in (*NEW_SHAPES, ","):
        kept.update(tokenizer(word, add_special_tokens=False)["input_ids"])
    kept.update(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in kept]


def train_unet(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    latents: tuple[torch.Tensor, torch.Tensor],
    captions: list[str],
    settings: PretrainSettings,
    rng: random.Random,
    generator: torch.Generator,
    progress: _Progress,
    stop: StopFlag,
) -> _Ema | None:
    """Epsilon prediction with the SD1 schedule, text encoder and UNet together; the EMA (None when stopped)."""
    model_spec = spec("sd1", tiny=True)
    scheduler = build_scheduler(model_spec)
    alphas = scheduler.alphas_cumprod.float()
    factor = 0.18215
    tokenizer = tiny_tokenizer()
    token_ids = {c: tokenizer(c, add_special_tokens=False, truncation=False)["input_ids"] for c in {*captions, ""}}
    pool, comma = _prefix_pool(tokenizer, token_ids.values()), tokenizer(",", add_special_tokens=False)["input_ids"]
    snr = alphas / (1.0 - alphas)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.unet_lr, weight_decay=0.0)
    ema = _Ema([unet, text_encoder], settings.ema_decay)
    mean, std = latents
    unet.train()
    text_encoder.train()
    for step in range(settings.unet_steps):
        if stop.requested:
            return None
        lr = _lr_at(step, settings, settings.unet_lr, settings.unet_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = [rng.randrange(len(captions)) for _ in range(settings.unet_batch)]
        texts = ["" if rng.random() < settings.caption_dropout else captions[i] for i in index]
        prompt_ids = [
            [*rng.sample(pool, rng.randint(1, 3)), *comma, *token_ids[t]]
            if t and rng.random() < settings.prefix_rate
            else token_ids[t]
            for t in texts
        ]
        clip_skip = 2 if step % 2 else 1
        ids = token_rows(tokenizer, prompt_ids, 1)
        hidden, _ = encode_ids(text_encoder, ids, sdxl=False, clip_skip=clip_skip)
        picked = torch.tensor(index)
        x0 = (mean[picked] + std[picked] * torch.randn(mean[picked].shape, generator=generator)) * factor
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, len(alphas), (len(index),), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
        prediction = unet(noisy, t, hidden).sample
        per_picture = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_picture * snr[t].clamp(max=settings.snr_gamma) / snr[t]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update()
        progress.step(2, float(loss.detach()), lr)
    return ema


def pretrain(
    out: Path, settings: PretrainSettings | None = None, reporter: Reporter | None = None, stop: StopFlag | None = None
) -> Path | None:
    """Pretrain the demo model and write it to ``out`` (.safetensors); None when stopped (nothing written)."""
    settings = settings or PretrainSettings()
    reporter = reporter or Reporter()
    stop = stop or StopFlag()
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        out = out.with_name(out.name + ".safetensors")
    started = time.perf_counter()
    model_spec = spec("sd1", tiny=True)
    rng = random.Random(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        generator = torch.Generator().manual_seed(settings.seed)
        reporter.message(f"Rendering {settings.pictures} pictures of the shapes world (seed {settings.seed})")
        pictures = world_pictures(settings.seed, settings.pictures, SIZE)
        images = torch.from_numpy(to_array([p.image for p in pictures]))
        captions = [p.caption for p in pictures]
        unet, vae = build_unet(model_spec), build_vae(model_spec)
        (text_encoder,) = build_text_encoders(model_spec)
        progress = _Progress(reporter, settings.total_steps)
        reporter.start(settings.total_steps, 2)
        try:
            reporter.message(f"Stage 1/2: the VAE, {settings.vae_steps} steps")
            if not train_vae(vae, images, settings, rng, generator, progress, stop):
                return None
            mean, _ = encode_all(vae, images)
            normalise_latents(vae, mean)
            latents = encode_all(vae, images)
            reporter.message(f"Stage 2/2: the UNet and the text encoder, {settings.unet_steps} steps")
            ema = train_unet(unet, text_encoder, latents, captions, settings, rng, generator, progress, stop)
            if ema is None:
                return None
        finally:
            reporter.finish()
    ema_unet, ema_te = ema.shadow
    metadata = {
        "format": "pt",
        DEMO_MARKER: "sd1-tiny-shapes",
        "seed": str(settings.seed),
        "train_tools_pretrain": str(asdict(settings)),
    }
    save_single_file(out, model_spec, ema_unet, vae, [ema_te], metadata)
    log.info(
        "Pretrained the shapes demo model in %.0f s: %s (%.1f MB)",
        time.perf_counter() - started,
        out,
        out.stat().st_size / 1e6,
    )
    return out
