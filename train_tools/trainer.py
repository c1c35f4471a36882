"""The trainer: a version's prepared dataset + a checkpoint -> LoRA files in ``trains/<run>/``.

Read top to bottom it is the whole recipe: prepare the data, load the model, attach LoRA adapters, cache
latents (and text-encoder outputs when the text encoder is frozen), then the usual noise-prediction loop with
accelerate handling the device, mixed precision and data parallelism.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import dataset as ds
from .config import TrainConfig
from .errors import UserError
from .fileio import sha256_file, write_json
from .progress import Reporter, StepInfo, StopFlag
from .store import Version

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    files: list[Path]
    steps: int
    epochs_done: int
    interrupted: bool
    losses: list[float] = field(default_factory=list)

    @property
    def final_file(self) -> Path | None:
        return self.files[-1] if self.files else None


def resolve_precision(requested: str, device: torch.device) -> str:
    """The mixed precision accelerate can do on ``device``; the CPU trains in fp32 (and says so)."""
    if requested == "no":
        return "no"
    if device.type != "cuda":
        log.warning("%s mixed precision needs a CUDA GPU; training in fp32 on the %s instead.", requested,
                    device.type.upper())
        return "no"
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        log.warning("This GPU cannot do bf16; using fp16 mixed precision instead.")
        return "fp16"
    return requested


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_items(version: Version, config: TrainConfig, reporter: Reporter) -> list[ds.DatasetItem]:
    """Bring ``prepared/`` up to date with the originals and the settings, and read it."""
    options = ds.PrepareOptions.from_config(config, trigger_word_default=version.project)
    report = ds.prepare_dataset(version.originals_dir, version.prepared_dir, options)
    for refusal in report.refused:
        reporter.message(f"skipped {refusal}")
    items = ds.load_items(version.prepared_dir)
    if not items:
        raise UserError(f"Version '{version.name}' of '{version.project}' has no usable images; add pictures "
                        "with 'python -m train_tools dataset add' or the Upload Dataset button.")
    return items


def text_transformer(te: torch.nn.Module) -> torch.nn.Module:
    """The CLIP transformer inside a text encoder: transformers 5 dropped the ``text_model`` wrapper of
    CLIPTextModel (the projection variant keeps it), the WebUI hosts' 4.x has it everywhere."""
    return getattr(te, "text_model", te)


def shuffle_caption(caption: str, keep_tokens: int, rng: random.Random) -> str:
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(t for t in head + tail if t)


class Trainer:
    """One training run. ``run()`` does everything; the steps are separate methods so tests can look inside."""

    def __init__(self, version: Version, config: TrainConfig, checkpoint: Path, *, reporter: Reporter | None = None,
                 stop: StopFlag | None = None, device: str | None = None, run_name: str | None = None) -> None:
        config.validate()
        self.version = version
        self.config = config
        self.checkpoint = Path(checkpoint)
        self.reporter = reporter or Reporter()
        self.stop = stop or StopFlag()
        self.requested_device = device
        self.run_name = run_name
        self.output_name = config.output_name or version.default_output_name
        self.prepared = False

    # ------------------------------------------------------------------ set-up
    def prepare(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from .loader import load_model
        from .network import attach_lora, lora_parameters, text_encoder_target_modules, unet_target_modules

        cfg = self.config
        self.started_at = time.time()
        device = pick_device(self.requested_device)
        precision = resolve_precision(cfg.mixed_precision, device)
        self.accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
        self.device = self.accelerator.device
        set_seed(cfg.seed)

        self.items = prepare_items(self.version, cfg, self.reporter)
        self.repeats = cfg.repeats or ds.auto_repeats(len(self.items))

        self.reporter.message(f"Loading {self.checkpoint.name}")
        self.model = load_model(self.checkpoint, device="cpu", dtype=torch.float32)
        m = self.model
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        m.unet.requires_grad_(False)
        m.vae.requires_grad_(False)
        for te in m.text_encoders:
            te.requires_grad_(False)
        self.train_te = cfg.train_text_encoder
        if len(m.text_encoders) != 1:
            raise UserError(f"Training a {m.family} checkpoint is not supported yet; use an SD1 or SD2 checkpoint.")
        self.te = m.text_encoders[0]
        self.tokenizer = m.tokenizers[0]

        move(m.unet, self.device, self.weight_dtype)
        move(self.te, self.device, self.weight_dtype)
        attach_lora(m.unet, unet_target_modules(m.unet), cfg.network_dim, cfg.network_alpha)
        params: list[dict[str, Any]] = [
            {"params": _fp32(lora_parameters(m.unet)), "lr": cfg.effective_unet_lr()}]
        if self.train_te:
            attach_lora(self.te, text_encoder_target_modules(self.te), cfg.network_dim, cfg.network_alpha)
            params.append({"params": _fp32(lora_parameters(self.te)), "lr": cfg.effective_text_encoder_lr()})
        self.trainable = [p for g in params for p in g["params"]]
        if cfg.gradient_checkpointing:
            m.unet.enable_gradient_checkpointing()
            if self.train_te:
                self.te.gradient_checkpointing_enable()
                text_transformer(self.te).embeddings.requires_grad_(True)  # keeps checkpointed grads flowing

        self.use_clip_skip = m.family in ("sd1",)
        if m.family.startswith("sd2") and cfg.clip_skip != 1:
            # The WebUI ignores clip skip for SD2's OpenCLIP text encoder: the penultimate layer is built in.
            log.info("Clip skip %d is ignored for SD2 checkpoints, as the WebUI does.", cfg.clip_skip)

        self.cache_latents()
        self.cached_text = self.cache_text() if not self.train_te and not cfg.shuffle_caption else None

        from .optim import make_lr_scheduler, make_optimizer

        self.sampler = ds.BucketBatchSampler(self.items, cfg.batch_size, seed=cfg.seed, repeats=self.repeats)
        self.batches_per_epoch = self._local_batch_count()
        self.total_steps = self.batches_per_epoch * cfg.epochs
        optimizer = make_optimizer(cfg.optimizer, params, cfg.learning_rate, device=self.device)
        lr_scheduler = make_lr_scheduler(cfg.lr_scheduler, optimizer, warmup_steps=cfg.lr_warmup_steps,
                                         total_steps=self.total_steps)
        if self.train_te:
            m.unet, self.te, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
                m.unet, self.te, optimizer, lr_scheduler)
        else:
            m.unet, self.optimizer, self.lr_scheduler = self.accelerator.prepare(m.unet, optimizer, lr_scheduler)
        self.noise_scheduler = m.noise_scheduler
        self.prepared = True

    def _local_batch_count(self) -> int:
        n = len(self.sampler)
        return n // self.accelerator.num_processes if self.accelerator.num_processes > 1 else n

    # ------------------------------------------------------------------ caches
    @torch.no_grad()
    def cache_latents(self) -> None:
        """Encode every image (and its mirror with flip augmentation) once: the VAE never runs per step."""
        vae = move(self.model.vae, self.device, torch.float32)  # fp32: the SD VAE overflows in fp16
        self.latent_cache: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        self.reporter.message(f"Caching latents of {len(self.items)} images")
        for item in self.items:
            pixels = ds.image_to_tensor(ds.open_prepared(item)).unsqueeze(0)
            variants = [pixels] + ([pixels.flip(-1)] if self.config.flip_aug else [])
            entry = []
            for px in variants:
                dist = vae.encode(px.to(self.device)).latent_dist
                entry.append((dist.mean.squeeze(0).cpu(), dist.std.squeeze(0).cpu()))
            self.latent_cache.append(entry)
        self.scaling_factor = float(vae.config.scaling_factor)
        vae.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def cache_text(self) -> list[torch.Tensor]:
        out = []
        with self.accelerator.autocast():
            for item in self.items:
                out.append(self.encode_text([item.caption]).squeeze(0).cpu())
        return out

    # ------------------------------------------------------------------ the step
    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Token ids in chunks of 75 with start/end tokens, as the WebUI splits long prompts: (B, n*77)."""
        tok = self.tokenizer
        chunks = self.config.max_token_length // 75
        bos, eos = tok.bos_token_id, tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        rows = []
        for caption in captions:
            ids = tok(caption, add_special_tokens=False, truncation=False)["input_ids"][: 75 * chunks]
            row: list[int] = []
            for c in range(chunks):
                part = ids[75 * c: 75 * (c + 1)]
                body = [bos] + part + [eos]
                row += body + [pad] * (77 - len(body))
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long)

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenize(captions).to(self.device)
        te = self.accelerator.unwrap_model(self.te) if hasattr(self, "accelerator") else self.te
        hidden = []
        for chunk in ids.split(77, dim=1):
            if self.use_clip_skip and self.config.clip_skip > 1:
                out = self.te(chunk, output_hidden_states=True)
                h = out.hidden_states[-self.config.clip_skip]
                h = text_transformer(te).final_layer_norm(h)
            else:
                h = self.te(chunk)[0]
            hidden.append(h)
        return torch.cat(hidden, dim=1)

    def latents_for(self, indices: list[int], rng: random.Random, generator: torch.Generator | None) -> torch.Tensor:
        out = []
        for i in indices:
            variants = self.latent_cache[i]
            mean, std = variants[rng.randrange(len(variants))]
            eps = torch.randn(mean.shape, generator=generator)
            out.append(mean + std * eps)
        return torch.stack(out).to(self.device) * self.scaling_factor

    def captions_for(self, indices: list[int], rng: random.Random) -> list[str]:
        caps = [self.items[i].caption for i in indices]
        if self.config.shuffle_caption:
            caps = [shuffle_caption(c, self.config.keep_tokens, rng) for c in caps]
        return caps

    def loss(self, latents: torch.Tensor, text: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
             ) -> torch.Tensor:
        sched = self.noise_scheduler
        noisy = sched.add_noise(latents, noise, timesteps)
        with self.accelerator.autocast():
            pred = self.model.unet(noisy.to(self.weight_dtype), timesteps, text.to(self.weight_dtype)).sample
        if self.model.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.config.min_snr_gamma:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(sched, timesteps)
            weight = torch.clamp(snr, max=self.config.min_snr_gamma)
            weight = weight / (snr + 1) if self.model.prediction_type == "v_prediction" else weight / snr
            loss = loss * weight
        return loss.mean()

    def sample_noise(self, latents: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        if self.config.noise_offset:
            offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
            noise = noise + self.config.noise_offset * offset.to(self.device)
        return noise

    def sample_timesteps(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        steps = self.noise_scheduler.config.num_train_timesteps
        return torch.randint(0, steps, (n,), generator=generator).to(self.device)

    def text_for(self, indices: list[int], rng: random.Random) -> torch.Tensor:
        if self.cached_text is not None:
            return torch.stack([self.cached_text[i] for i in indices]).to(self.device)
        if self.train_te:
            return self.encode_text(self.captions_for(indices, rng))
        with torch.no_grad():
            return self.encode_text(self.captions_for(indices, rng))

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

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        if not self.prepared:
            self.prepare()
        cfg, acc = self.config, self.accelerator
        stamp = self.run_name or time.strftime("%Y%m%d-%H%M%S", time.localtime(self.started_at))
        run_dir = self.version.new_run_dir(stamp) if acc.is_main_process else self.version.trains_dir / stamp
        if acc.is_main_process:
            self._write_run_snapshot(run_dir)
        self.base_sha256 = sha256_file(self.checkpoint) if acc.is_main_process else None
        self.reporter.start(self.total_steps, cfg.epochs)
        rng = random.Random(cfg.seed + acc.process_index)
        gen = torch.Generator().manual_seed(cfg.seed + acc.process_index)
        files: list[Path] = []
        losses: list[float] = []
        step = 0
        epoch = 0
        interrupted = False
        t0 = time.perf_counter()
        unet = self.model.unet
        unet.train()
        if self.train_te:
            self.te.train()
        for epoch in range(1, cfg.epochs + 1):
            self.sampler.set_epoch(epoch)
            batches = list(self.sampler)
            if acc.num_processes > 1:
                batches = batches[: self.batches_per_epoch * acc.num_processes][acc.process_index::acc.num_processes]
            for indices in batches:
                with acc.accumulate(unet):
                    latents = self.latents_for(indices, rng, gen)
                    text = self.text_for(indices, rng)
                    noise = self.sample_noise(latents, gen)
                    timesteps = self.sample_timesteps(len(indices), gen)
                    loss = self.loss(latents, text, noise, timesteps)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm:
                        acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                step += 1
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise UserError("The loss became NaN/inf: lower the learning rate, or use bf16 or fp32 "
                                    "instead of fp16.")
                losses.append(value)
                self.reporter.step(self._step_info(step, epoch, losses, t0))
                if self.stop.requested:
                    interrupted = True
                    break
            if interrupted:
                break
            last = epoch == cfg.epochs
            if last or epoch % cfg.save_every_n_epochs == 0:
                name = f"{self.output_name}.safetensors" if last else f"{self.output_name}-{epoch:06d}.safetensors"
                files.append(self.save(run_dir / name, epoch, step))
        if interrupted:
            self.reporter.message(f"Interrupted at step {step}; saving what was learned so far.")
            files.append(self.save(run_dir / f"{self.output_name}-{epoch:06d}-interrupted.safetensors", epoch, step))
        self.reporter.finish()
        return TrainResult(run_dir, [f for f in files if f is not None], step, epoch, interrupted, losses)

    def _step_info(self, step: int, epoch: int, losses: list[float], t0: float) -> StepInfo:
        elapsed = time.perf_counter() - t0
        speed = step / elapsed if elapsed > 0 else 0.0
        window = losses[-20:]
        return StepInfo(step=step, total_steps=self.total_steps, epoch=epoch, total_epochs=self.config.epochs,
                        loss=losses[-1], avg_loss=sum(window) / len(window),
                        lr=float(self.lr_scheduler.get_last_lr()[0]), steps_per_s=speed,
                        eta_s=(self.total_steps - step) / speed if speed else 0.0)

    # ------------------------------------------------------------------ saving
    def _write_run_snapshot(self, run_dir: Path) -> None:
        """The run keeps its own copy of settings and captions, so later edits cannot change what it was."""
        write_json(run_dir / "settings.json", {**self.config.to_dict(), "base_model_path": str(self.checkpoint),
                                               "repeats_used": self.repeats})
        write_json(run_dir / "captions.json", {item.image.name: item.caption for item in self.items})

    def save(self, path: Path, epoch: int, step: int) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        from .lora_format import build_metadata, kohya_state_dict, save_lora

        unet = acc.unwrap_model(self.model.unet)
        tes = [acc.unwrap_model(self.te)] if self.train_te else []
        tensors = kohya_state_dict(unet=unet, text_encoders=tes, family=self.model.family)
        folder = f"{self.repeats}_{self.output_name}"
        metadata = build_metadata(
            self.config,
            family=self.model.family,
            output_name=self.output_name,
            base_model_path=self.checkpoint,
            base_model_sha256=self.base_sha256,
            num_train_images=len(self.items) * self.repeats,
            tag_frequency={folder: ds.tag_frequency(self.items)},
            dataset_dirs={folder: {"n_repeats": self.repeats, "img_count": len(self.items)}},
            epoch=epoch,
            steps=step,
            training_started_at=self.started_at,
            training_finished_at=time.time(),
            bucket_info=ds.bucket_info(self.items),
        )
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.config.save_precision]
        save_lora(path, tensors, metadata, dtype=dtype)
        self.reporter.saved(path, epoch)
        return path


def move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(device, dtype)`` without diffusers' warning about modules to keep in fp32: the frozen base
    is meant to be cast whole (the LoRA weights stay fp32, see ``_fp32``)."""
    return torch.nn.Module.to(module, device=device, dtype=dtype)


def _fp32(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """LoRA weights train in fp32 even when the frozen base is fp16/bf16 (autocast does the mixing)."""
    for p in params:
        p.data = p.data.float()
    return params


def train(version: Version, config: TrainConfig, checkpoint: Path, **kwargs: Any) -> TrainResult:
    return Trainer(version, config, checkpoint, **kwargs).run()
