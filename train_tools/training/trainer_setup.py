"""The trainer's set-up (``prepare``): the device and precision, the pictures, the model with its LoRA, the
latent and text caches, the batches and the optimizer: everything before the first step.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from ..data.items import auto_repeats, image_to_tensor, open_prepared
from ..data.preparation import load_reg_items, prepare_items
from ..data.sampler import BucketBatchSampler, RegularisedBatchSampler
from ..errors import UserError
from ..fileio import sha256_file
from ..models.text_encoding import Conditioning
from .precision import DTYPES, make_accelerator, resolve_precision
from .trainer_base import TrainerBase

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def pick_device(device: str | None) -> torch.device:
    """The device to train on: ``device``, or the first CUDA GPU when there is one, else the CPU. A GPU asked
    for where torch has none is a UserError that says why, before anything loads."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        why = (
            "the installed torch is a CPU-only build"
            if torch.version.cuda is None
            else "torch finds no GPU or no NVIDIA driver"
        )
        raise UserError(
            f"Training on {device} needs a CUDA GPU, and {why} (torch {torch.__version__}): choose the device cpu, "
            "or install torch for your GPU."
        )
    return chosen


class SetupMixin(TrainerBase):
    """``prepare`` and its stages, and the caches it fills (``cache_latents``, ``cache_text``)."""

    def prepare(self) -> None:
        """Everything before the first step: the pictures, the model with its LoRA, the caches, the batches
        and the optimizer. Called by ``run``; callable first (tests, the benchmark) to look inside."""
        from accelerate.utils import set_seed

        cfg = self.config
        self.started_at = time.time()
        device = pick_device(self.requested_device)
        precision = resolve_precision(cfg.mixed_precision, device, exact=self.exact_precision)
        self.mixed_precision_used = precision
        self.accelerator = make_accelerator(precision, device)
        self.device = self.accelerator.device
        self.weight_dtype = DTYPES[precision]
        set_seed(cfg.seed)
        self._prepare_pictures()
        params = self._load_model_with_lora()
        self.cache_latents()
        varies = cfg.shuffle_caption or cfg.caption_tag_dropout_rate > 0  # captions that change at every step
        self.cached_text = self.cache_text() if not self.train_te and not varies else None
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
        # The validation split: a few training pictures held out, the same ones for a seed (a resumed run too).
        self.dataset_items = self.items  # all of them, as the run's snapshot and state list them
        self.items, self.val_items = split_validation(self.items, cfg.validation_split, cfg.seed)
        # Indices below len(items) are training pictures, then class pictures (batches draw from both), then
        # the held-out ones (the caches hold all).
        self.all_items = self.items + self.reg_items + self.val_items
        self.repeats = cfg.repeats or auto_repeats(len(self.items))
        if self.reg_items:
            self.reporter.message(
                f"{len(self.reg_items)} class pictures (regularisation), prior loss weight {cfg.prior_loss_weight:g}"
            )

    def _load_model_with_lora(self) -> list[dict[str, Any]]:
        """Load the checkpoint, freeze it, attach the LoRA; the optimizer's param groups (UNet, text encoder)."""
        from ..models.loader import load_model
        from ..networks.blocks import network_parts
        from ..networks.targets import text_encoder_target_modules, unet_target_modules
        from ..networks.types import attach_network
        from .param_groups import kept_targets, lr_groups

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
        conv = cfg.conv_rank()  # LoCon etc.: the 3x3 convolutions too, at their own rank and alpha
        kind, rank, alpha, factor = cfg.network_type, cfg.network_dim, cfg.network_alpha, cfg.lokr_factor
        unet_targets = kept_targets(unet_target_modules(m.unet, conv=conv is not None), cfg)
        for targets, part_rank, part_alpha, part_conv in network_parts(m.unet, unet_targets, cfg):  # block dims
            attach_network(m.unet, targets, kind, part_rank, part_alpha, part_conv, factor)
        if self.train_te:
            for te in self.tes:
                attach_network(te, text_encoder_target_modules(te), kind, rank, alpha, None, factor)
        if self.start_tensors is not None:
            from ..networks.lora_format import model_prefixes
            from ..networks.start_from import load_start

            parts = model_prefixes(m.unet, self.tes if self.train_te else [], m.family)
            loaded = load_start(parts, self.start_tensors, cfg.network_weights, self.train_te)
            self.reporter.message(f"Training on from {cfg.network_weights} ({loaded} layers)")
            self.start_tensors = None
        params = lr_groups(m.unet, cfg.effective_unet_lr(), cfg, unet=True)
        if self.train_te:
            params += lr_groups(torch.nn.ModuleList(self.tes), cfg.effective_text_encoder_lr(), cfg, unet=False)
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
            log.info("Clip skip %d is ignored for %s checkpoints, as the WebUI does.", cfg.clip_skip, m.family.upper())
        return params

    def _plan_batches(self) -> None:
        """The sampler of each epoch's batches and the run's step count."""
        cfg = self.config
        if self.reg_items:
            self.sampler: Any = RegularisedBatchSampler(
                self.items + self.reg_items, len(self.items), cfg.batch_size, seed=cfg.seed, repeats=self.repeats
            )
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
        # The first group's rate may be a block's or LoRA+'s multiple: the UNet's rate is what the tab shows.
        first = float(params[0]["lr"]) if params else 0.0
        self.lr_shown_factor = cfg.effective_unet_lr() / first if first > 0 else 1.0
        optimizer = make_optimizer(
            cfg.optimizer, params, cfg.learning_rate, device=self.device, given=cfg.optimizer_args
        )
        # accelerate steps a prepared scheduler once per process at every optimizer step: count in those units.
        ticks = self.accelerator.num_processes
        lr_scheduler = make_lr_scheduler(
            cfg.lr_scheduler, optimizer, warmup_steps=cfg.lr_warmup_steps * ticks, total_steps=self.total_steps * ticks
        )
        self.optimizer, self.lr_scheduler = self.accelerator.prepare(optimizer, lr_scheduler)
        from ..models.loader import set_training_target

        set_training_target(m, v_prediction=cfg.v_parameterization, zero_terminal_snr=cfg.zero_terminal_snr)
        ztsnr = bool(m.noise_scheduler.config.get("rescale_betas_zero_snr"))
        if m.prediction_type == "v_prediction" or ztsnr:
            zero = " with a zero-terminal-SNR schedule" if ztsnr else ""
            self.reporter.message(f"Training target: {m.prediction_type.replace('_', '-')}{zero}")
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
        from ..networks.types import network_parameters

        params = [p for te in self.tes for p in network_parameters(te) if p.requires_grad]
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
            log.info(
                "%d text-encoder LoRA tensors get no gradient (layers after the one used); frozen.", len(unreachable)
            )

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
        n = self.sampler.batch_count(epoch) if isinstance(self.sampler, RegularisedBatchSampler) else len(self.sampler)
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
        vae: AutoencoderKL | None = None
        shas: dict[Path, set[str]] = {folder: set() for folder in folders}
        with acc.main_process_first() if disks else contextlib.nullcontext():
            n, reg = len(self.items), len(self.reg_items)
            for index, item in enumerate(self.all_items):
                folder = folders[int(n <= index < n + reg)]  # class pictures in prepared_reg/, the rest prepared/
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
                            pixels = image_to_tensor(open_prepared(item)).unsqueeze(0)
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
        self.reporter.message(
            f"Latents: {total - self.latent_encodes} of {total} from the cache, {self.latent_encodes} encoded"
        )
        self.mask_cache = self._loss_masks(flips) if self.config.masked_loss else []
        self.scaling_factor = float(self.model.vae.config.scaling_factor)
        if vae is not None:
            vae.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.no_grad()
    def _loss_masks(self, flips: tuple[bool, ...]) -> list[list[torch.Tensor | None]]:
        """Each item's loss mask at its latents' size, per cached variant (mirrored with them); None for an item
        without a mask (learned whole)."""
        from .losses import latent_mask

        masks: list[list[torch.Tensor | None]] = []
        for item, variants in zip(self.all_items, self.latent_cache, strict=True):
            shape = tuple(variants[0][0].shape[-2:])
            masks.append([latent_mask(item.mask, shape, flip) if item.mask else None for flip in flips])
        count = sum(1 for item in self.all_items if item.mask)
        if count:
            self.reporter.message(f"Masked loss: {count} of {len(self.all_items)} pictures have a mask")
        else:
            log.warning("Masked loss is on, but no picture has a mask (an alpha channel or a name.mask.png).")
        return masks

    def cache_text(self) -> list[Conditioning]:
        """Every caption through the frozen text encoder(s) once (batch of one each, kept on the CPU), and with
        caption dropout the empty caption last (what a dropped caption trains with)."""
        cfg = self.config
        dropout = [""] if cfg.caption_dropout_rate > 0 or cfg.caption_dropout_every_n_epochs > 0 else []
        out = []
        with self.accelerator.autocast():
            for caption in [*(item.caption for item in self.all_items), *dropout]:
                out.append(self.encode_text([caption]).to("cpu"))
        return out


def enable_te_checkpointing(te: PreTrainedModel) -> None:
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


def move(module: ModuleT, device: torch.device, dtype: torch.dtype) -> ModuleT:
    """``module.to(device, dtype)`` without diffusers' warning about modules to keep in fp32: the frozen base
    is meant to be cast whole (the LoRA weights stay fp32, see ``param_groups.lr_groups``)."""
    return torch.nn.Module.to(module, device=device, dtype=dtype)


def split_validation(items: list[Any], share: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(trained, held out): ``share`` of the pictures (at least one when asked, never all) drawn with ``seed``,
    both in their order."""
    if share <= 0 or len(items) < 2:
        if share > 0:
            log.warning("One picture only: no validation split (it is needed for training).")
        return items, []
    count = min(len(items) - 1, max(1, round(len(items) * share)))
    held = set(random.Random(seed).sample(range(len(items)), count))
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
