"""One training step's parts: a batch's latents and text conditioning, its noise and timesteps, the loss, the
gradient clipping and the optimizer's step (the loop that puts them together is ``trainer.py``'s).
"""

from __future__ import annotations

import random
from typing import Any

import torch

from ..data.items import DatasetItem
from ..models.text_encoding import Conditioning, encode_ids, token_rows
from .losses import debiased_weight, huber_c_for, noise_offsets, per_item_loss, pyramid_noise
from .trainer_base import TrainerBase


def sdxl_time_ids(item: DatasetItem) -> list[float]:
    """SDXL's size conditioning of one picture, as its training defined it: original (h, w), top-left of the
    crop (top, left) in the resized picture, and target (h, w).

    The prepared picture is the original resized to cover its bucket and centre-cropped (``fit_to_bucket``),
    so the crop follows from the two sizes; a picture of unknown original size counts as uncropped.
    """
    target_w, target_h = item.size
    orig_w, orig_h = item.source_size or item.size
    scale = max(target_w / orig_w, target_h / orig_h)
    top = max(0, round((orig_h * scale - target_h) / 2))
    left = max(0, round((orig_w * scale - target_w) / 2))
    return [float(orig_h), float(orig_w), float(top), float(left), float(target_h), float(target_w)]


def shuffle_caption(
    caption: str, keep_tokens: int, rng: random.Random, shuffle: bool = True, tag_dropout: float = 0.0
) -> str:
    """The caption's comma-separated tags after the first ``keep_tokens``: shuffled, then each left out with
    probability ``tag_dropout`` (kohya's order)."""
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle:
        rng.shuffle(tail)
    if tag_dropout > 0:
        tail = [t for t in tail if rng.random() >= tag_dropout]
    return ", ".join(t for t in head + tail if t)


class StepMixin(TrainerBase):
    """What the loop calls for each batch, and ``fixed_batch_loss`` to compare before and after training."""

    def tokenize(self, captions: list[str], tokenizer: Any = None) -> torch.Tensor:
        """Token ids in chunks of 75 with start/end tokens, as the WebUI splits long prompts: (B, n*77).

        ``tokenizer`` defaults to the first; SDXL's second pads with its own token ("!").
        """
        tok = tokenizer if tokenizer is not None else self.tokenizer
        chunks = self.config.max_token_length // 75
        ids = [
            tok(caption, add_special_tokens=False, truncation=False)["input_ids"][: 75 * chunks] for caption in captions
        ]
        return token_rows(tok, ids, chunks)

    def encode_text(self, captions: list[str]) -> Conditioning:
        """The captions as the UNet's text conditioning, the way the WebUI encodes prompts.

        Each encoder reads every 77-token chunk; the chunks' hidden states follow each other (B, n*77, C).
        SD1/SD2 have one encoder. SDXL has two whose hidden states stand side by side (768 + 1280 = 2048), and
        the pooled, projected output of the second encoder's first chunk goes to the UNet as ``text_embeds``.
        """
        hidden: list[torch.Tensor] = []
        pooled: torch.Tensor | None = None
        sdxl = len(self.tes) > 1
        clip_skip = self.config.clip_skip if self.use_clip_skip and not sdxl else 1
        for te, tok in zip(self.tes, self.tokenizers, strict=False):
            ids = self.tokenize(captions, tok).to(self.device)
            base = self.accelerator.unwrap_model(te) if hasattr(self, "accelerator") else te
            h, p = encode_ids(te, ids, sdxl=sdxl, clip_skip=clip_skip, base=base)
            hidden.append(h)
            pooled = p if p is not None else pooled
        return Conditioning(torch.cat(hidden, dim=-1), pooled)

    def latents_for(
        self,
        indices: list[int],
        rng: random.Random,
        generator: torch.Generator | None,
        chosen: list[int] | None = None,
    ) -> torch.Tensor:
        """The items' latents, one cached variant each (the mirrored one with flip_aug), drawn afresh from its
        distribution; ``chosen`` gets the variants taken (for their loss masks)."""
        out = []
        for i in indices:
            variants = self.latent_cache[i]
            k = rng.randrange(len(variants))
            if chosen is not None:
                chosen.append(k)
            mean, std = variants[k]
            eps = torch.randn(mean.shape, generator=generator)
            out.append(mean + std * eps)
        return torch.stack(out).to(self.device) * self.scaling_factor

    def caption_dropped(self, rng: random.Random, epoch: int | None) -> bool:
        """Whether this item trains with an empty caption at this step (never for ``epoch=None``: fixed batches).
        The rng is drawn from only when a dropout rate is set, so runs without one draw as before."""
        cfg = self.config
        if epoch is None:
            return False
        if cfg.caption_dropout_every_n_epochs and epoch % cfg.caption_dropout_every_n_epochs == 0:
            return True
        return cfg.caption_dropout_rate > 0 and rng.random() < cfg.caption_dropout_rate

    def captions_for(self, indices: list[int], rng: random.Random, epoch: int | None = None) -> list[str]:
        cfg = self.config
        tag_dropout = cfg.caption_tag_dropout_rate if epoch is not None else 0.0  # fixed batches keep every tag
        caps = []
        for i in indices:
            caption = "" if self.caption_dropped(rng, epoch) else self.all_items[i].caption
            if caption and (cfg.shuffle_caption or tag_dropout):
                caption = shuffle_caption(caption, cfg.keep_tokens, rng, cfg.shuffle_caption, tag_dropout)
            caps.append(caption)
        return caps

    def loss_mask(self, indices: list[int], chosen: list[int]) -> torch.Tensor | None:
        """The batch's loss masks at latent size (B, 1, h, w), 1 for an item without one; None when no item of
        the batch has a mask (or masked_loss is off: ``mask_cache`` is empty then)."""
        masks = [self.mask_cache[i][k] if self.mask_cache else None for i, k in zip(indices, chosen, strict=True)]
        if all(m is None for m in masks):
            return None
        shape = self.latent_cache[indices[0]][0][0].shape[-2:]
        return torch.stack([m if m is not None else torch.ones(1, *shape) for m in masks]).to(self.device)

    def loss_weights(self, indices: list[int]) -> torch.Tensor | None:
        """Each item's weight in the batch loss: 1 for a training picture, ``prior_loss_weight`` for a class
        picture; None (all 1) when the run has no class pictures."""
        if not self.reg_items:
            return None
        n = len(self.items)
        weights = [self.config.prior_loss_weight if i >= n else 1.0 for i in indices]
        return torch.tensor(weights, dtype=torch.float32, device=self.device)

    def loss(
        self,
        latents: torch.Tensor,
        text: Conditioning | torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        weights: torch.Tensor | None = None,
        input_noise: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The batch's mean loss; ``weights`` (one per item, see ``loss_weights``) scale each item's part.
        ``input_noise`` (input perturbation, see ``perturbed_noise``) noises the input in place of ``noise``;
        the target stays ``noise``'s. ``mask`` (``loss_mask``) limits each item's loss to its masked area."""
        cfg = self.config
        sched = self.noise_scheduler
        noisy = sched.add_noise(latents, noise if input_noise is None else input_noise, timesteps)
        cond = text if isinstance(text, Conditioning) else Conditioning(text)
        dtype = self.weight_dtype
        with self.accelerator.autocast():
            pred = self.model.unet(
                noisy.to(dtype), timesteps, cond.hidden.to(dtype), added_cond_kwargs=cond.added_cond_kwargs(dtype)
            ).sample
        v = self.model.prediction_type == "v_prediction"
        target = sched.get_velocity(latents, noise, timesteps) if v else noise
        huber_c = torch.zeros(len(timesteps))
        if cfg.loss_type in ("huber", "smooth_l1"):
            huber_c = huber_c_for(cfg.huber_schedule, cfg.huber_c, timesteps, sched)
        loss = per_item_loss(pred, target, cfg.loss_type, huber_c, mask)
        if cfg.min_snr_gamma or cfg.debiased_estimation_loss or (v and cfg.scale_v_pred_loss_like_noise_pred):
            snr = signal_to_noise(sched, timesteps)
        if cfg.min_snr_gamma:
            weight = torch.clamp(snr, max=cfg.min_snr_gamma)
            # min(snr, gamma) / snr tends to 1 where a zero-terminal-SNR schedule reaches snr 0.
            eps_weight = torch.where(snr > 0, weight / snr.clamp(min=1e-12), torch.ones_like(snr))
            loss = loss * (weight / (snr + 1) if v else eps_weight)
        if v and cfg.scale_v_pred_loss_like_noise_pred:
            loss = loss * (snr / (snr + 1))  # kohya's scale_v_prediction_loss_like_noise_prediction
        if cfg.debiased_estimation_loss:
            loss = loss * debiased_weight(snr, v)
        if weights is not None:
            loss = loss * weights.to(loss.device)
        return loss.mean()

    def sample_noise(self, latents: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The step's noise: Gaussian, plus the offset noise (with its adaptive part) or else pyramid noise."""
        cfg = self.config
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        if cfg.noise_offset:
            offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
            if cfg.adaptive_noise_scale:
                offset = noise_offsets(latents, offset, cfg.noise_offset, cfg.adaptive_noise_scale)
                noise = noise + offset.to(self.device)
            else:
                noise = noise + cfg.noise_offset * offset.to(self.device)
        elif cfg.multires_noise_iterations:
            noise = pyramid_noise(noise, generator, cfg.multires_noise_iterations, cfg.multires_noise_discount)
        return noise

    def perturbed_noise(self, noise: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor | None:
        """Input perturbation (``ip_noise_gamma``): the noise that noises the input, the target keeping ``noise``;
        None when off (no random number is drawn then)."""
        if not self.config.ip_noise_gamma:
            return None
        extra = torch.randn(noise.shape, generator=generator).to(noise.device, noise.dtype)
        return noise + self.config.ip_noise_gamma * extra

    def sample_timesteps(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        steps = self.noise_scheduler.config.num_train_timesteps
        low, high = self.config.min_timestep, min(self.config.max_timestep, steps)
        return torch.randint(low, high, (n,), generator=generator).to(self.device)

    def text_for(self, indices: list[int], rng: random.Random, epoch: int | None = None) -> Conditioning:
        """Everything the UNet is conditioned on for these items besides the latents (cached when frozen).
        ``epoch`` is the training epoch (caption dropout); None for a fixed batch, which never drops one."""
        if self.cached_text is not None:
            cached = self.cached_text
            cond = Conditioning.cat([cached[-1] if self.caption_dropped(rng, epoch) else cached[i] for i in indices])
        elif self.train_te:
            cond = self.encode_text(self.captions_for(indices, rng, epoch))
        else:
            with torch.no_grad():
                cond = self.encode_text(self.captions_for(indices, rng, epoch))
        if self.needs_time_ids:
            cond.time_ids = torch.tensor([sdxl_time_ids(self.all_items[i]) for i in indices], dtype=torch.float32)
        return cond.to(self.device)

    @torch.no_grad()
    def clip_gradients(self, max_norm: float) -> None:
        """Scale the gradients down to a total norm of ``max_norm`` when they are above it (accelerate's and
        torch's clipping). On a CPU without a gradient scaler the norm is read first, which costs no
        synchronisation there: within ``max_norm`` (most steps), torch's clipping would only multiply every
        gradient by 1.0, one more pass over them all (0.3 ms of a 37 ms step on the demo model)."""
        acc = self.accelerator
        if self.device.type == "cpu" and getattr(acc, "scaler", None) is None:
            grads = [p.grad.detach() for p in self.optimized if p.grad is not None]
            if not grads:
                return
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            if float(norm) + 1e-6 <= max_norm:  # torch's factor max_norm / (norm + 1e-6), capped at 1, is 1
                return
        acc.clip_grad_norm_(self.optimized, max_norm)

    def optimizer_step(self) -> None:
        """The optimizer's step. accelerate's wrapper does something only with a gradient scaler (fp16) or
        while gradients are being accumulated; otherwise it steps the optimizer after looking the lomo_optim
        package up on disk, twice per step (importlib's find_spec over sys.path: 0.15 ms a step on this
        2-core machine, more on a WebUI's long sys.path), so the wrapped optimizer is stepped directly."""
        acc = self.accelerator
        if getattr(acc, "scaler", None) is None and acc.sync_gradients and hasattr(self.optimizer, "optimizer"):
            self.optimizer.optimizer.step()
        else:
            self.optimizer.step()

    @torch.no_grad()
    def fixed_batch_loss(self, seed: int = 0, n: int = 4) -> float:
        """The loss on a fixed batch with fixed noise and timesteps: comparable before and after training."""
        gen = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        indices = [i % len(self.items) for i in range(n)]
        total = 0.0
        for i in indices:
            latents = self.latents_for([i], rng, gen)
            text = self.text_for([i], rng)
            noise = self.sample_noise(latents, gen)
            timesteps = self.sample_timesteps(1, gen)
            total += float(self.loss(latents, text, noise, timesteps))
        return total / len(indices)

    def validation_loss(self) -> float | None:
        """The mean loss on the held-out pictures (``validation_split``) at fixed noise and at timesteps spread
        over the schedule (100, 300, ... 900 of 1000): the same draws at every validation, so the values compare;
        None without held-out pictures. No gradient, and the training's random streams are left alone."""
        if not self.val_items:
            return None
        first = len(self.items) + len(self.reg_items)
        steps = int(self.noise_scheduler.config.num_train_timesteps)
        spread = [int(steps * (k + 0.5) / VALIDATION_TIMESTEPS) for k in range(VALIDATION_TIMESTEPS)]
        gen = torch.Generator().manual_seed(self.config.seed)
        rng = random.Random(self.config.seed)
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(first, first + len(self.val_items)):
                latents = self.latents_for([i], rng, gen)
                text = self.text_for([i], rng)
                for t in spread:
                    noise = torch.randn(latents.shape, generator=gen).to(latents.device, latents.dtype)
                    total += float(self.loss(latents, text, noise, torch.tensor([t], device=latents.device)))
                    count += 1
        return total / count


VALIDATION_TIMESTEPS = 5


def signal_to_noise(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar / (1 - alpha_bar), as diffusers' ``compute_snr`` has it; written here because
    importing ``diffusers.training_utils`` fails with the transformers 4.30 that A1111 pins."""
    alphas = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas / (1.0 - alphas)
