"""The trainer: a version's prepared dataset + a checkpoint -> LoRA files in ``trains/<run>/``.

Read top to bottom it is the whole recipe: prepare the data, load the model, attach LoRA adapters, cache
latents (and text-encoder outputs when the text encoder is frozen), then the usual noise-prediction loop with
accelerate handling the device, mixed precision and data parallelism.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data import dataset as ds
from ..data.buckets import bucket_info
from ..config import TrainConfig
from ..errors import UserError
from ..fileio import read_json, sha256_file, write_json
from ..names import check_name
from ..data.preparation import load_reg_items, prepare_items
from ..progress import Reporter, StepInfo, StopFlag, Stopped
from .resume import ResumePoint, clear_leftovers, resume_point
from .state import FINAL, INTERRUPT, SAVE
from ..data.sampler import BucketBatchSampler, RegularisedBatchSampler
from ..store import Version
from .text_encoding import Conditioning, encode_ids, token_rows

log = logging.getLogger(__name__)

REG_CAPTIONS = "reg_captions.json"  # the run's snapshot of its class pictures' captions (beside captions.json)
REG_PREFIX = "reg/"  # class pictures in a training state's picture list


@dataclass
class TrainResult:
    run_dir: Path | None  # None: stopped before the run began (while preparing the pictures)
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


def sdxl_time_ids(item: ds.DatasetItem) -> list[float]:
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


def shuffle_caption(caption: str, keep_tokens: int, rng: random.Random) -> str:
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(t for t in head + tail if t)


class Trainer:
    """One training run. ``run()`` does everything; the steps are separate methods so tests can look inside."""

    def __init__(self, version: Version, config: TrainConfig, checkpoint: Path, *, reporter: Reporter | None = None,
                 stop: StopFlag | None = None, device: str | None = None, run_name: str | None = None,
                 resume_from: Path | None = None, host: Any = None) -> None:
        self.host = host  # the program hosting the run (captioners, models folder); None = standalone defaults
        # Resuming: ``resume_from`` is a run folder (trains/<run>); the run continues there with the settings
        # it began with (its own snapshot wins over ``config``, the version's settings of today).
        self.resume: ResumePoint | None = None
        if resume_from is not None:
            self.resume = resume_point(Path(resume_from), fallback=config)
            if self.resume.config.to_dict() != config.to_dict():
                log.info("Resuming %s with the settings it began with.", self.resume.run_dir.name)
            config = self.resume.config
        # Every name that reaches a file is checked before any work: the output name (also a resumed run's, as
        # its snapshot may have been edited), its length beside the version's folder, and the run's name.
        version.check_settings(config)
        if run_name is not None:
            check_name(run_name, "run name")
        self.version = version
        self.config = config
        self.checkpoint = Path(checkpoint)
        self.reporter = reporter or Reporter()
        self.stop = stop or StopFlag()
        self.requested_device = device
        self.run_name = run_name
        self.output_name = version.output_name(config)
        # Lay the LoRA weights out flat where the optimizer allows it (flat_params.py); off only to measure or
        # test what the layout changes.
        self.flat_layout = True
        self.prepared = False
        self.holds_version = False  # True inside ``run``: no other run uses the version's folders meanwhile

    # ------------------------------------------------------------------ set-up
    def prepare(self) -> None:
        """Everything before the first step: the pictures, the model with its LoRA, the caches, the batches
        and the optimizer. Called by ``run``; callable first (tests, the benchmark) to look inside."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        cfg = self.config
        self.started_at = time.time()
        device = pick_device(self.requested_device)
        precision = resolve_precision(cfg.mixed_precision, device)
        self.accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        set_seed(cfg.seed)
        self._prepare_pictures()
        params = self._load_model_with_lora()
        self.cache_latents()
        self.cached_text = self.cache_text() if not self.train_te and not cfg.shuffle_caption else None
        if self.cached_text is not None:
            self._release_text_encoders()
        self._plan_batches()
        self._build_optimizer(params)
        self.prepared = True

    def _prepare_pictures(self) -> None:
        """The version's pictures (and class pictures) prepared with the run's settings, and read."""
        cfg = self.config
        with self.accelerator.main_process_first():  # one process writes prepared/, the others then read it
            items = prepare_items(self.version, cfg, self.reporter, host=self.host, stop=self.stop)
            self.items, self.reg_items = self._resumed_items(items, load_reg_items(self.version))
        # Indices below len(items) are training pictures, the rest class pictures (caches and batches use both).
        self.all_items = self.items + self.reg_items
        self.repeats = cfg.repeats or ds.auto_repeats(len(self.items))
        if self.reg_items:
            self.reporter.message(f"{len(self.reg_items)} class pictures (regularisation), prior loss weight "
                                  f"{cfg.prior_loss_weight:g}")

    def _load_model_with_lora(self) -> list[dict[str, Any]]:
        """Load the checkpoint, freeze it, attach the LoRA; the optimizer's param groups (UNet, text encoder)."""
        from ..models.loader import load_model
        from ..networks.lora import attach_lora, lora_parameters, text_encoder_target_modules, unet_target_modules

        cfg = self.config
        self.reporter.message(f"Loading {self.checkpoint.name}")
        self.model = load_model(self.checkpoint, device="cpu", dtype=torch.float32)
        m = self.model
        m.unet.requires_grad_(False)
        m.vae.requires_grad_(False)
        for te in m.text_encoders:
            te.requires_grad_(False)
        self.train_te = cfg.train_text_encoder
        # One text encoder (SD1, SD2) or two (SDXL: CLIP-L, then OpenCLIP-bigG with projection), each with its
        # own tokenizer; ``te``/``tokenizer`` name the first for code that only needs one.
        self.tes: list[torch.nn.Module] = list(m.text_encoders)
        self.tokenizers: list[Any] = list(m.tokenizers)
        self.te, self.tokenizer = self.tes[0], self.tokenizers[0]
        # SDXL's UNet also takes the pooled text embedding and the picture's size/crop numbers.
        self.needs_time_ids = getattr(m.unet.config, "addition_embed_type", None) == "text_time"

        move(m.unet, self.device, self.weight_dtype)
        for te in self.tes:
            move(te, self.device, self.weight_dtype)
        attach_lora(m.unet, unet_target_modules(m.unet), cfg.network_dim, cfg.network_alpha)
        params: list[dict[str, Any]] = [
            {"params": _fp32(lora_parameters(m.unet)), "lr": cfg.effective_unet_lr()}]
        if self.train_te:
            te_params: list[torch.nn.Parameter] = []
            for te in self.tes:
                attach_lora(te, text_encoder_target_modules(te), cfg.network_dim, cfg.network_alpha)
                te_params += _fp32(lora_parameters(te))
            params.append({"params": te_params, "lr": cfg.effective_text_encoder_lr()})
        self.trainable = [p for g in params for p in g["params"]]
        if cfg.gradient_checkpointing:
            m.unet.enable_gradient_checkpointing()
            if self.train_te:
                for te in self.tes:
                    enable_te_checkpointing(te)
        if self.train_te:
            # Training mode for every encoder, not only the first: transformers checkpoints only in training
            # mode (CLIP has no dropout, so the outputs are the same either way).
            for te in self.tes:
                te.train()

        self.use_clip_skip = m.family in ("sd1",)
        if m.family != "sd1" and cfg.clip_skip != 1:
            # The WebUI ignores clip skip for SD2's OpenCLIP text encoder (the penultimate layer is built in)
            # and for SDXL (both encoders' penultimate layers are used).
            log.info("Clip skip %d is ignored for %s checkpoints, as the WebUI does.", cfg.clip_skip,
                     m.family.upper())
        return params

    def _plan_batches(self) -> None:
        """The sampler of each epoch's batches and the run's step count."""
        cfg = self.config
        if self.reg_items:
            self.sampler: Any = RegularisedBatchSampler(self.all_items, len(self.items), cfg.batch_size,
                                                        seed=cfg.seed, repeats=self.repeats)
        else:
            self.sampler = BucketBatchSampler(self.items, cfg.batch_size, seed=cfg.seed, repeats=self.repeats)
        self.batches_per_epoch = self._local_batch_count(1)
        self.total_steps = sum(self._local_batch_count(epoch) for epoch in range(1, cfg.epochs + 1))

    def _build_optimizer(self, params: list[dict[str, Any]]) -> None:
        """The models handed to accelerate, then the optimizer and schedule over ``params``."""
        from .flat_params import ELEMENTWISE_OPTIMIZERS, flatten_groups, views_intact
        from .optim import make_lr_scheduler, make_optimizer

        cfg, m = self.config, self.model
        if self.train_te:
            self._freeze_unreachable_te_lora()
        if cfg.torch_compile:
            m.unet.compile()  # in place: the module, its parameter names and the saved LoRA stay the same
        # The models first: accelerate may move (copy) their weights, e.g. to "cpu:0" under DDP on CPUs.
        trained_tes = self.tes if self.train_te else []
        models = self.accelerator.prepare(m.unet, *trained_tes)
        models = list(models) if isinstance(models, (tuple, list)) else [models]
        m.unet = models[0]
        if self.train_te:
            self.tes = models[1:]
            self.te = self.tes[0]
        # What the optimizer, the clipping and the zeroing see: one contiguous tensor per group for the
        # elementwise optimizers (see flat_params.py), else the LoRA weights themselves.
        self.flat = self.flat_layout and cfg.optimizer in ELEMENTWISE_OPTIMIZERS
        if self.flat:
            params = flatten_groups(params)
        self.optimized = [p for g in params for p in g["params"]]
        optimizer = make_optimizer(cfg.optimizer, params, cfg.learning_rate, device=self.device)
        # accelerate steps a prepared scheduler once per process at every optimizer step: count in those units.
        ticks = self.accelerator.num_processes
        lr_scheduler = make_lr_scheduler(cfg.lr_scheduler, optimizer, warmup_steps=cfg.lr_warmup_steps * ticks,
                                         total_steps=self.total_steps * ticks)
        self.optimizer, self.lr_scheduler = self.accelerator.prepare(optimizer, lr_scheduler)
        self.noise_scheduler = m.noise_scheduler
        if self.flat and not all(views_intact(f) for f in self.optimized):
            raise RuntimeError("A LoRA weight left its flat tensor while the model was prepared; it would not train.")

    def _freeze_unreachable_te_lora(self) -> None:
        """Freeze the text-encoder LoRA weights that no gradient can reach, before the optimizer is built.

        The UNet reads an inner layer of the encoder (clip skip, SDXL's penultimate layer), so the LoRA of the
        layers after it never gets a gradient: DDP, which waits for one per trainable weight, would stop at the
        second step, and in a flat group (flat_params.py) they would get zeros, which AdamW's weight decay still
        moves. One probe through the encoders finds them; frozen, they keep their starting values, as they
        would anyway, and the saved file is unchanged.
        """
        from ..networks.lora import lora_parameters

        params = [p for te in self.tes for p in lora_parameters(te) if p.requires_grad]
        with self.accelerator.autocast():
            cond = self.encode_text([self.items[0].caption])
        probe = cond.hidden.float().sum()
        if cond.pooled is not None:
            probe = probe + cond.pooled.float().sum()
        probe.backward()
        unreachable = [p for p in params if p.grad is None]
        for p in params:
            p.grad = None
        for p in unreachable:
            p.requires_grad_(False)
        if unreachable:
            log.info("%d text-encoder LoRA tensors get no gradient (layers after the one used); frozen.",
                     len(unreachable))

    def _release_text_encoders(self) -> None:
        """Frozen encoders whose outputs are cached are not needed again: off the GPU they leave room for the
        UNet (SDXL's two weigh 1.6 GB in fp16)."""
        if self.device.type != "cuda":
            return
        for te in self.tes:
            te.to("cpu")
        torch.cuda.empty_cache()

    def _local_batch_count(self, epoch: int) -> int:
        """The batches each process trains in ``epoch`` (the same in every epoch without class pictures)."""
        if isinstance(self.sampler, RegularisedBatchSampler):
            n = self.sampler.batch_count(epoch)
        else:
            n = len(self.sampler)
        return n // self.accelerator.num_processes if self.accelerator.num_processes > 1 else n

    # ------------------------------------------------------------------ caches
    @torch.no_grad()
    def cache_latents(self) -> None:
        """Encode every image (and its mirror with flip augmentation) once: the VAE never runs per step.

        With ``cache_latents`` on (the default) the encoded pictures are also kept in ``prepared/.latents/``
        (see ``latent_cache``; class pictures in ``prepared_reg/.latents/``), so a later run or a restart encodes
        only new or changed pictures; with several processes the main one encodes and writes first and the
        others read. ``latent_encodes`` counts the VAE calls of this run.
        """
        import contextlib

        from ..data.latent_cache import LatentDiskCache, vae_identity

        acc = self.accelerator
        # One disk cache per prepared folder: prepared/ and, with class pictures, prepared_reg/.
        folders = [self.version.prepared_dir] + ([self.version.prepared_reg_dir] if self.reg_items else [])
        disks: dict[Path, LatentDiskCache] = {}
        if self.config.cache_latents:
            vae_id = vae_identity(self.model.vae)
            disks = {folder: LatentDiskCache(folder, vae_id, self.config.resolution) for folder in folders}
        flips = (False, True) if self.config.flip_aug else (False,)
        self.latent_cache: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        self.latent_encodes = 0
        vae: torch.nn.Module | None = None
        shas: dict[Path, set[str]] = {folder: set() for folder in folders}
        with acc.main_process_first() if disks else contextlib.nullcontext():
            for index, item in enumerate(self.all_items):
                folder = folders[int(index >= len(self.items))]
                disk = disks.get(folder)
                sha = sha256_file(item.image)
                shas[folder].add(sha)
                pixels: torch.Tensor | None = None
                entry = []
                for flip in flips:
                    cached = disk.load(sha, item.size, flip) if disk is not None else None
                    if cached is None:
                        if vae is None:  # only moved to the device when something is not cached
                            vae = move(self.model.vae, self.device, torch.float32)  # fp32: SD's VAE overflows fp16
                        if pixels is None:
                            pixels = ds.image_to_tensor(ds.open_prepared(item)).unsqueeze(0)
                        dist = vae.encode((pixels.flip(-1) if flip else pixels).to(self.device)).latent_dist
                        cached = (dist.mean.squeeze(0).float().cpu(), dist.std.squeeze(0).float().cpu())
                        self.latent_encodes += 1
                        if disk is not None and acc.is_main_process:
                            disk.store(sha, item.size, flip, *cached)
                    entry.append(cached)
                self.latent_cache.append(entry)
        if acc.is_main_process:
            for folder, cache in disks.items():
                cache.prune(shas[folder])
                if self.holds_version:  # no other run can be writing there: a killed run's leftovers can go
                    for path in cache.remove_leftovers():
                        log.info("Removed %s, half-written when a run stopped.", path.name)
        total = len(self.all_items) * len(flips)
        self.reporter.message(f"Latents: {total - self.latent_encodes} of {total} from the cache, "
                              f"{self.latent_encodes} encoded")
        self.scaling_factor = float(self.model.vae.config.scaling_factor)
        if vae is not None:
            vae.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.no_grad()
    def cache_text(self) -> list[Conditioning]:
        """Every caption through the frozen text encoder(s) once (batch of one each, kept on the CPU)."""
        out = []
        with self.accelerator.autocast():
            for item in self.all_items:
                out.append(self.encode_text([item.caption]).to("cpu"))
        return out

    # ------------------------------------------------------------------ the step
    def tokenize(self, captions: list[str], tokenizer: Any = None) -> torch.Tensor:
        """Token ids in chunks of 75 with start/end tokens, as the WebUI splits long prompts: (B, n*77).

        ``tokenizer`` defaults to the first; SDXL's second pads with its own token ("!").
        """
        tok = tokenizer if tokenizer is not None else self.tokenizer
        chunks = self.config.max_token_length // 75
        ids = [tok(caption, add_special_tokens=False, truncation=False)["input_ids"][: 75 * chunks]
               for caption in captions]
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
        for te, tok in zip(self.tes, self.tokenizers):
            ids = self.tokenize(captions, tok).to(self.device)
            base = self.accelerator.unwrap_model(te) if hasattr(self, "accelerator") else te
            h, p = encode_ids(te, ids, sdxl=sdxl, clip_skip=clip_skip, base=base)
            hidden.append(h)
            pooled = p if p is not None else pooled
        return Conditioning(torch.cat(hidden, dim=-1), pooled)

    def latents_for(self, indices: list[int], rng: random.Random, generator: torch.Generator | None) -> torch.Tensor:
        out = []
        for i in indices:
            variants = self.latent_cache[i]
            mean, std = variants[rng.randrange(len(variants))]
            eps = torch.randn(mean.shape, generator=generator)
            out.append(mean + std * eps)
        return torch.stack(out).to(self.device) * self.scaling_factor

    def captions_for(self, indices: list[int], rng: random.Random) -> list[str]:
        caps = [self.all_items[i].caption for i in indices]
        if self.config.shuffle_caption:
            caps = [shuffle_caption(c, self.config.keep_tokens, rng) for c in caps]
        return caps

    def loss_weights(self, indices: list[int]) -> torch.Tensor | None:
        """Each item's weight in the batch loss: 1 for a training picture, ``prior_loss_weight`` for a class
        picture; None (all 1) when the run has no class pictures."""
        if not self.reg_items:
            return None
        n = len(self.items)
        weights = [self.config.prior_loss_weight if i >= n else 1.0 for i in indices]
        return torch.tensor(weights, dtype=torch.float32, device=self.device)

    def loss(self, latents: torch.Tensor, text: Conditioning | torch.Tensor, noise: torch.Tensor,
             timesteps: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The batch's mean loss; ``weights`` (one per item, see ``loss_weights``) scale each item's part."""
        sched = self.noise_scheduler
        noisy = sched.add_noise(latents, noise, timesteps)
        cond = text if isinstance(text, Conditioning) else Conditioning(text)
        dtype = self.weight_dtype
        with self.accelerator.autocast():
            pred = self.model.unet(noisy.to(dtype), timesteps, cond.hidden.to(dtype),
                                   added_cond_kwargs=cond.added_cond_kwargs(dtype)).sample
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
        if weights is not None:
            loss = loss * weights.to(loss.device)
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

    def text_for(self, indices: list[int], rng: random.Random) -> Conditioning:
        """Everything the UNet is conditioned on for these items besides the latents (cached when frozen)."""
        if self.cached_text is not None:
            cond = Conditioning.cat([self.cached_text[i] for i in indices])
        elif self.train_te:
            cond = self.encode_text(self.captions_for(indices, rng))
        else:
            with torch.no_grad():
                cond = self.encode_text(self.captions_for(indices, rng))
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

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """Train (or go on training a resumed run) while holding the device and the version.

        Any failure frees the model and the GPU memory first, so the WebUI keeps working; running out of
        memory becomes a UserError naming what to lower or turn on.
        """
        from ..devicelock import hold, hold_version

        label = f"{self.version.project} / {self.version.name}"
        with hold(self.version.data_dir, self.requested_device, label), \
                hold_version(self.version.path, label):
            out_of_memory = False
            self.holds_version = True
            try:
                return self._train()
            except BaseException as exc:
                if not is_out_of_memory(exc):
                    self.release_memory()
                    raise
                log.error("Out of memory: %s", str(exc))  # str: a logged exception would keep its tensors alive
                out_of_memory = True
            finally:
                self.holds_version = False
            # Outside the except block: the error and its traceback (which holds the step's tensors) are gone.
            if out_of_memory:
                self.release_memory()
                raise UserError(out_of_memory_advice(self.config))
        raise AssertionError("unreachable")

    def _train(self) -> TrainResult:
        point = self.resume
        if point is not None and point.finished:
            return self._finished_result(point)
        if not self.prepared:
            try:
                self.prepare()
            except Stopped:  # Interrupt while the pictures were being prepared: nothing trained, nothing saved
                self.reporter.message("Stopped while preparing the pictures; nothing was trained.")
                self.reporter.finish()
                return TrainResult(None, [], 0, 0, True)
        cfg, acc = self.config, self.accelerator
        from ..models.loader import file_sha256  # remembered per file: a 7 GB checkpoint is hashed once, not per run

        self.base_sha256 = file_sha256(self.checkpoint) if acc.is_main_process else None
        rng = random.Random(cfg.seed + acc.process_index)
        gen = torch.Generator().manual_seed(cfg.seed + acc.process_index)
        files: list[Path] = []
        losses: list[float] = []
        step = 0
        start_epoch, start_batch = 1, 0
        state = point.state if point is not None else None
        if point is not None and point.started_at is not None:
            self.started_at = point.started_at  # the run's LoRA files keep the time it began
        if state is not None:  # checked against the run, then restored, before anything in the run changes
            self._restore_state(state, rng, gen)
        run_dir = self._open_run_dir()
        if state is not None:
            step, start_epoch, start_batch = state.step, state.epoch, state.batch
            files = [run_dir / name for name in state.files if (run_dir / name).is_file()]
            losses = list(state.losses)
            self.reporter.message(f"Resuming {run_dir.name} at step {step} of {self.total_steps} "
                                  f"(epoch {start_epoch} of {cfg.epochs}).")
        self._first_step = step
        self.reporter.start(self.total_steps, cfg.epochs)
        epoch = start_epoch
        done = start_batch
        interrupted = False
        t0 = time.perf_counter()
        unet = self.model.unet
        unet.train()
        if self.train_te:
            self.te.train()
        for epoch in range(start_epoch, cfg.epochs + 1):
            self.sampler.set_epoch(epoch)
            batches = list(self.sampler)
            if acc.num_processes > 1:
                local = self._local_batch_count(epoch)
                batches = batches[: local * acc.num_processes][acc.process_index::acc.num_processes]
            # The order depends only on (seed, epoch): a resumed run skips the batches it already trained.
            done = start_batch if epoch == start_epoch else 0
            for indices in batches[done:]:
                with acc.accumulate(unet):
                    latents = self.latents_for(indices, rng, gen)
                    text = self.text_for(indices, rng)
                    noise = self.sample_noise(latents, gen)
                    timesteps = self.sample_timesteps(len(indices), gen)
                    loss = self.loss(latents, text, noise, timesteps, self.loss_weights(indices))
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm:
                        self.clip_gradients(cfg.max_grad_norm)
                    self.optimizer_step()
                    self.lr_scheduler.step()
                    # Flat gradients are zeroed in place: the weights' gradients are views of them.
                    self.optimizer.zero_grad(set_to_none=not self.flat)
                step += 1
                done += 1
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
                self._save_state(run_dir, FINAL if last else SAVE, epoch + 1, 0, step, finished=last, files=files,
                                 losses=losses, rng=rng, gen=gen)
                if files[-1] is not None:
                    self._sample(run_dir, files[-1], epoch)
        if interrupted:
            self.reporter.message(f"Interrupted at step {step}; saving what was learned so far.")
            files.append(self.save(run_dir / f"{self.output_name}-{epoch:06d}-interrupted.safetensors", epoch, step))
            self._save_state(run_dir, INTERRUPT, epoch, done, step, finished=False, files=files, losses=losses,
                             rng=rng, gen=gen)
        result = TrainResult(run_dir, [f for f in files if f is not None], step, epoch, interrupted, losses)
        if not interrupted and cfg.preview_at_end and acc.is_main_process:
            if self.device.type == "cuda":
                self.release_memory()  # the previewer's copy of the model needs the training one's memory
            self._previews_at_end(run_dir)
        self._close_previewer()
        self.reporter.finish()
        return result

    # ------------------------------------------------------------------ previews during and after training
    def _previewer(self) -> Any:
        """The diffusers previewer (its own copy of the base model), made once per run when first needed. The
        host's own generator is not used here: the WebUI's model is unloaded while training runs."""
        if getattr(self, "_preview", None) is None:
            from ..previews.previews import make_previewer

            self._preview = make_previewer(None, self.checkpoint, clip_skip=self.config.clip_skip,
                                           device=str(self.device))
        return self._preview

    def _close_previewer(self) -> None:
        preview = getattr(self, "_preview", None)
        if preview is not None:
            preview.close()
            self._preview = None

    def _sample(self, run_dir: Path, lora_file: Path, epoch: int) -> None:
        """``sample_every_n_epochs``: a few pictures of the file just saved, in ``<run>/samples/``."""
        from ..previews.previews import default_settings, sample_epoch, should_sample

        if not should_sample(self.config, epoch):
            return
        try:
            settings = default_settings(self.config, self.version.project)
            paths = sample_epoch(run_dir, lora_file, epoch, self._previewer(), settings)
            self.reporter.message(f"Samples of epoch {epoch}: {', '.join(p.name for p in paths)}")
        except UserError as exc:  # a sample must never cost the run
            self.reporter.message(f"No samples for epoch {epoch}: {exc}")

    def _previews_at_end(self, run_dir: Path) -> None:
        """``preview_at_end``: the grid of every saved file at every weight, once training is done."""
        from ..previews.previews import previews_at_end

        self.reporter.message("Generating the preview grid")
        try:
            grid = previews_at_end(run_dir, self.config, self.version.project, self._previewer(),
                                   reporter=self.reporter, stop=self.stop)
            if grid is not None:
                self.reporter.message(f"Preview grid: {grid}")
        except UserError as exc:
            self.reporter.message(f"No preview grid: {exc}")

    def _step_info(self, step: int, epoch: int, losses: list[float], t0: float) -> StepInfo:
        elapsed = time.perf_counter() - t0
        # Steps of this session only: a resumed run did the earlier ones at another time.
        speed = (step - getattr(self, "_first_step", 0)) / elapsed if elapsed > 0 else 0.0
        window = losses[-20:]
        return StepInfo(step=step, total_steps=self.total_steps, epoch=epoch, total_epochs=self.config.epochs,
                        loss=losses[-1], avg_loss=sum(window) / len(window),
                        lr=float(self.lr_scheduler.get_last_lr()[0]), steps_per_s=speed,
                        eta_s=(self.total_steps - step) / speed if speed else 0.0)

    # ------------------------------------------------------------------ saving
    def _write_run_snapshot(self, run_dir: Path) -> None:
        """The run keeps its own copy of settings and captions, so later edits cannot change what it was."""
        write_json(run_dir / "settings.json", {**self.config.to_dict(), "base_model_path": str(self.checkpoint),
                                               "repeats_used": self.repeats, "started_at": self.started_at})
        write_json(run_dir / "captions.json", {item.image.name: item.caption for item in self.items})
        if self.reg_items:
            write_json(run_dir / REG_CAPTIONS, {item.image.name: item.caption for item in self.reg_items})

    def save(self, path: Path, epoch: int, step: int) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        from ..networks.lora_format import build_metadata, kohya_state_dict, save_lora

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
            tag_frequency={folder: ds.tag_frequency(self.items)},
            dataset_dirs={folder: {"n_repeats": self.repeats, "img_count": len(self.items)}},
            epoch=epoch,
            steps=step,
            training_started_at=self.started_at,
            training_finished_at=time.time(),
            bucket_info=bucket_info(self.items),
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

    # ------------------------------------------------------------------ training state (resume)
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

    def _item_names(self, items: list[ds.DatasetItem] | None = None,
                    reg_items: list[ds.DatasetItem] | None = None) -> list[str]:
        """The pictures of the run as its state lists them: the training pictures, then the class pictures
        prefixed with ``reg/`` (a run without class pictures lists what it always did)."""
        items = self.items if items is None else items
        reg_items = self.reg_items if reg_items is None else reg_items
        return [item.image.name for item in items] + [f"{REG_PREFIX}{item.image.name}" for item in reg_items]

    def _resumed_items(self, items: list[ds.DatasetItem], reg_items: list[ds.DatasetItem]
                       ) -> tuple[list[ds.DatasetItem], list[ds.DatasetItem]]:
        """A resumed run trains on the pictures (and class pictures) it began with and their captions of then
        (its snapshot)."""
        point = self.resume
        if point is None:
            return items, reg_items
        names = self._item_names(items, reg_items)
        if point.state is not None and point.state.items and names != point.state.items:
            raise UserError(f"The pictures of {self.version.project} / {self.version.name} changed since run "
                            f"{point.run_dir.name} began ({len(point.state.items)} then, {len(names)} now), so it "
                            "cannot go on as it was; start a new run.")
        return (self._snapshot_captions(items, point.run_dir / "captions.json"),
                self._snapshot_captions(reg_items, point.run_dir / REG_CAPTIONS))

    @staticmethod
    def _snapshot_captions(items: list[ds.DatasetItem], snapshot: Path) -> list[ds.DatasetItem]:
        if not items or not snapshot.is_file():
            return items
        captions = read_json(snapshot, "start a new run", what=f"The captions of run {snapshot.parent.name},")
        if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
            raise UserError(f"The captions of run {snapshot.parent.name}, {snapshot}, are not a table of captions; "
                            "start a new run.")
        return [dataclasses.replace(item, caption=str(captions.get(item.image.name, item.caption)))
                for item in items]

    def _lora_modules(self) -> dict[str, torch.nn.Module]:
        acc = self.accelerator
        modules = {"unet": acc.unwrap_model(self.model.unet)}
        if self.train_te:
            modules.update({f"te{i}": acc.unwrap_model(te) for i, te in enumerate(self.tes)})
        return modules

    def _lora_weights(self) -> dict[str, torch.nn.Parameter]:
        return {f"{prefix}.{name}": param for prefix, module in self._lora_modules().items()
                for name, param in module.named_parameters() if "lora_" in name}

    def _save_state(self, run_dir: Path, kind: str, epoch: int, batch: int, step: int, *, finished: bool,
                    files: list[Path | None], losses: list[float], rng: random.Random, gen: torch.Generator
                    ) -> None:
        """Save everything a resume needs (see ``resume.py``); every process sends its generators."""
        from .state import TrainState, capture_rng
        from .state_files import save_state

        acc = self.accelerator
        rngs = [capture_rng(rng, gen)]
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            rngs = gather_object(rngs)
        if not acc.is_main_process:
            return
        scaler = getattr(acc, "scaler", None)
        state = TrainState(
            epoch=epoch, batch=batch, step=step, kind=kind, finished=finished, config=self.config.to_dict(),
            base_model_path=str(self.checkpoint), base_sha256=self.base_sha256, started_at=self.started_at,
            files=[f.name for f in files if f is not None], losses=list(losses),
            items=self._item_names(),
            lora={name: p.detach().to("cpu", copy=True) for name, p in self._lora_weights().items()},
            optimizer=self.optimizer.state_dict(), scheduler=self.lr_scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else None, rng=rngs)
        save_state(run_dir, state)

    def _restore_state(self, state: Any, rng: random.Random, gen: torch.Generator) -> None:
        """Put the weights, optimizer, schedule and generators back where the state left them."""
        from .state import capture_rng, restore_rng
        from .state_checks import damaged, fit_problem

        acc = self.accelerator
        run = self.resume.run_dir.name if self.resume is not None else "the run"
        if self.base_sha256 and state.base_sha256 and self.base_sha256 != state.base_sha256:
            began = Path(state.base_model_path).name
            if began == self.checkpoint.name:
                raise UserError(f"{self.checkpoint.name} is not the base model run {run} began with: the file "
                                "has the same name, but its content changed since (its sha256 differs); put the "
                                "original file back to resume the run, or start a new run.")
            raise UserError(f"{self.checkpoint.name} is not the base model run {run} began with "
                            f"({began}); choose that checkpoint to resume it.")
        if len(state.rng) != acc.num_processes:
            raise UserError(f"Run {run} was trained by {len(state.rng)} processes; resume it with as many GPUs "
                            f"(this is {acc.num_processes}).")
        weights = self._lora_weights()
        if weights.keys() != state.lora.keys():
            raise UserError(f"The training state of run {run} does not fit this model and these settings; start "
                            "a new run.")
        layout = _optimizer_layout(state.optimizer)
        if layout is not None and layout != _optimizer_layout(self.optimizer.state_dict()):
            # another layout of the optimizer's weights (e.g. from before flat_params.py)
            raise UserError(f"The optimizer state of run {run} does not fit this version of Train Tools; start a "
                            "new run.")
        scaler = getattr(acc, "scaler", None)
        batch_counts = [self._local_batch_count(epoch) for epoch in range(1, self.config.epochs + 1)]
        problem = fit_problem(state, batch_counts=batch_counts, weights=weights, optimizer=self.optimizer,
                              scheduler=self.lr_scheduler, scaler=scaler, rng_now=capture_rng(rng, gen),
                              ticks=acc.num_processes)
        if problem:
            raise damaged(Path(run), problem)
        try:  # the checks above leave nothing for these to refuse; should one still, it is the state's damage
            with torch.no_grad():
                for name, param in weights.items():
                    param.copy_(state.lora[name].to(param.device, param.dtype))
            self.optimizer.load_state_dict(state.optimizer)
            self.lr_scheduler.load_state_dict(state.scheduler)
            if scaler is not None and state.scaler:
                scaler.load_state_dict(state.scaler)
            restore_rng(state.rng[acc.process_index], rng, gen)
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, RuntimeError) as exc:
            if is_out_of_memory(exc):
                raise
            raise damaged(Path(run), f"{type(exc).__name__} while restoring it") from exc
        self.started_at = state.started_at

    def _finished_result(self, point: ResumePoint) -> TrainResult:
        state = point.state
        assert state is not None
        self.reporter.message(f"Run {point.run_dir.name} already finished; there is nothing to resume.")
        files = [point.run_dir / name for name in state.files if (point.run_dir / name).is_file()]
        return TrainResult(point.run_dir, files, state.step, state.epoch - 1, False, list(state.losses))

    def release_memory(self) -> None:
        """Drop the model, optimizer and caches and give their memory back (after a failure, an OOM above
        all): the WebUI's own model needs that memory, and the job keeps this trainer in its error."""
        acc = self.__dict__.get("accelerator")
        if acc is not None and hasattr(acc, "free_memory"):
            acc.free_memory()
        for name in ("model", "optimizer", "lr_scheduler", "latent_cache", "cached_text", "tes", "te",
                     "trainable", "optimized", "noise_scheduler", "unet"):
            if name in self.__dict__:
                setattr(self, name, None)
        self.prepared = False
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError (any torch), MPS/ROCm's RuntimeError "... out of memory", a host MemoryError."""
    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                  if isinstance(k, type))
    if isinstance(exc, (MemoryError, *kinds)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def out_of_memory_advice(config: TrainConfig) -> str:
    """What to lower or turn on, from the settings that ran out of memory."""
    lower = [f"the batch size (now {config.batch_size})"] if config.batch_size > 1 else []
    lower += [f"the resolution (now {config.resolution})", f"the network dim (now {config.network_dim})"]
    turn_on = [] if config.gradient_checkpointing else ["gradient checkpointing"]
    if config.optimizer not in ("AdamW8bit", "Lion8bit", "AdaFactor"):
        turn_on.append("an 8-bit optimizer (AdamW8bit)")
    if config.mixed_precision == "no":
        turn_on.append("fp16 or bf16 mixed precision")
    text = "Out of memory: training stopped and its memory was freed. Lower " + _join(lower)
    if turn_on:
        text += ", or turn on " + _join(turn_on)
    return text + "; closing other programs that use the GPU helps too."


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def enable_te_checkpointing(te: torch.nn.Module) -> None:
    """Gradient checkpointing of a text encoder whose only trainable weights are its LoRA layers.

    Non-reentrant checkpointing where transformers offers the choice (4.35+): gradients reach the LoRA weights
    inside each block without anything else needing a gradient. Older ones (A1111 pins 4.30) checkpoint
    reentrantly, which passes no gradient through a block whose input does not require one: the embeddings'
    output is made to require it (no embedding weight becomes trainable).
    """
    try:
        te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except TypeError:
        te.gradient_checkpointing_enable()
        te.enable_input_require_grads()


def move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``module.to(device, dtype)`` without diffusers' warning about modules to keep in fp32: the frozen base
    is meant to be cast whole (the LoRA weights stay fp32, see ``_fp32``)."""
    return torch.nn.Module.to(module, device=device, dtype=dtype)


def _fp32(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """LoRA weights train in fp32 even when the frozen base is fp16/bf16 (autocast does the mixing)."""
    for p in params:
        p.data = p.data.float()
    return params


def _optimizer_layout(state: Any) -> list[int] | None:
    """How many weights each group of an optimizer's state holds; None when it is no optimizer state at all."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        return None
    return [len(group["params"]) for group in groups]


def train(version: Version, config: TrainConfig, checkpoint: Path, **kwargs: Any) -> TrainResult:
    return Trainer(version, config, checkpoint, **kwargs).run()
