"""The training settings: one typed dataclass, the single source of every training parameter.

The command line (`--set key=value`), the tab's controls, the version's saved JSON and the LoRA file's
``ss_*`` metadata are all derived from the fields below and their ``metadata``; nothing lists them twice.
Defaults are those of the original Train Tools tab.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config_values import SettingsIO
from .config_values import setting_field as _f

OPTIMIZERS = ("Lion", "AdamW", "AdamW8bit", "Lion8bit", "SGDNesterov", "Prodigy", "AdaFactor")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISIONS = ("fp16", "bf16", "no")
SAVE_PRECISIONS = ("fp16", "bf16", "fp32")
CAPTION_MODES = ("use", "ignore", "prepend", "append")
CAPTIONERS = ("none", "wd14", "blip", "deepbooru")
# The network types every host applies (the LoRA file format reference); networks/types.py builds each.
NETWORK_TYPES = ("lora", "locon", "loha", "lokr", "dora")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
LOGGERS = ("tensorboard", "none")


@dataclass
class TrainConfig(SettingsIO):
    """Every parameter of a training run. Keys are the snake_case of the tab's labels."""

    # --- the common ones, shown first in the tab ---
    base_model: str = _f(
        "",
        "Train base model",
        "Checkpoint to train on: a file path, or a name from the checkpoint folder.",
        ss="ss_sd_model_name",
    )
    epochs: int = _f(
        20, "Number of epochs", "Passes over the dataset (x repeats).", ss="ss_num_epochs", min=1, max=10000
    )
    save_every_n_epochs: int = _f(
        2, "Save every n epochs", "Write a LoRA file every n epochs; the last epoch is always saved.", min=1, max=10000
    )
    batch_size: int = _f(
        1,
        "Batch size",
        "Images per step: larger is faster but needs more VRAM.",
        ss="ss_batch_size_per_device",
        min=1,
        max=256,
    )
    repeats: int = _f(
        0, "Repeats", "How often each image is seen per epoch; 0 = auto, max(4, 512 // images).", min=0, max=10000
    )
    learning_rate: float = _f(
        1e-4, "Learning rate", "Step size of the optimizer.", ss="ss_learning_rate", min=0.0, max=1.0
    )
    network_type: str = _f(
        "lora",
        "Network type",
        "lora: the usual LoRA, attention layers only. locon: LoRA on the convolutions too (textures, shapes). "
        "loha: Hadamard product of two low-rank pairs, more expressive at a low dim (use dim 4-32). lokr: "
        "Kronecker product, very small files (set the LoKr factor). dora: LoRA with a learned magnitude per "
        "input channel, closer to full fine-tuning, a little slower.",
        choices=NETWORK_TYPES,
    )
    network_dim: int = _f(
        128,
        "Network dim",
        "LoRA rank: larger holds more detail and makes a larger file.",
        ss="ss_network_dim",
        min=1,
        max=1024,
    )
    network_alpha: float = _f(
        64.0, "Network alpha", "Scales the update by alpha / dim.", ss="ss_network_alpha", min=0.0, max=1024.0
    )
    conv_dim: int = _f(
        0,
        "Conv dim (LoCon)",
        "Also adapt the UNet's 3x3 convolutions at this rank (LoCon; with loha, lokr and dora too): they carry "
        "shapes and textures the attention layers alone learn slowly; 0 = off, or the network dim for locon.",
        min=0,
        max=1024,
        advanced=True,
    )
    conv_alpha: float = _f(
        1.0,
        "Conv alpha",
        "Scales the convolutions' update by conv alpha / conv dim.",
        min=0.0,
        max=1024.0,
        advanced=True,
    )
    lokr_factor: int = _f(
        -1,
        "LoKr factor",
        "LoKr: splits each layer's sides into factor x rest; smaller = smaller file; -1 = as square as "
        "possible (LyCORIS' default; its guide suggests 4-16 for a small LoKr).",
        min=-1,
        max=1024,
        advanced=True,
    )
    optimizer: str = _f(
        "Lion",
        "Optimizer",
        "Lion and AdamW are the usual choices; 8bit ones save VRAM.",
        ss="ss_optimizer",
        choices=OPTIMIZERS,
    )
    optimizer_args: str = _f(
        "",
        "Optimizer arguments",
        "Besides the learning rate, as kohya's --optimizer_args: e.g. weight_decay=0.1 betas=0.9,0.99 "
        "(empty: each optimizer's defaults).",
        advanced=True,
    )
    clip_skip: int = _f(
        2, "Clip skip", "2 for anime checkpoints; 1 or 2 for photo-real (try both).", ss="ss_clip_skip", min=1, max=12
    )
    resolution: int = _f(
        512,
        "Resolution",
        "Training side length in pixels (the pixel budget of each bucket).",
        ss="ss_resolution",
        min=64,
        max=4096,
    )
    mixed_precision: str = _f(
        "fp16",
        "Mixed precision",
        "fp16 or bf16 on a GPU; a CPU trains in bf16 where it has bf16 instructions, else in fp32.",
        ss="ss_mixed_precision",
        choices=MIXED_PRECISIONS,
    )
    seed: int = _f(42, "Seed", "Same seed, same data and settings: same LoRA.", ss="ss_seed", min=0, max=2**32 - 1)
    train_text_encoder: bool = _f(True, "Train text encoder", "Also adapt the text encoder (the original did).")
    # --- advanced ---
    unet_lr: float = _f(
        0.0, "UNet learning rate", "0 = use the learning rate.", ss="ss_unet_lr", min=0.0, max=1.0, advanced=True
    )
    text_encoder_lr: float = _f(
        0.0,
        "Text encoder learning rate",
        "0 = use the learning rate.",
        ss="ss_text_encoder_lr",
        min=0.0,
        max=1.0,
        advanced=True,
    )
    block_dims: str = _f(
        "",
        "Block dims",
        "25 numbers apart by commas, the network dim of each UNet block (IN00-IN11, MID, OUT00-OUT11, kohya's "
        "block_dims); 0 = no network there. Empty = the network dim everywhere.",
        advanced=True,
    )
    block_alphas: str = _f(
        "",
        "Block alphas",
        "25 numbers: each block's alpha, beside Block dims. Empty = the network alpha.",
        advanced=True,
    )
    conv_block_dims: str = _f(
        "",
        "Conv block dims",
        "25 numbers: the convolutions' dim in each block (with LoCon or a conv dim); 0 = none there.",
        advanced=True,
    )
    conv_block_alphas: str = _f(
        "",
        "Conv block alphas",
        "25 numbers: the convolutions' alpha in each block. Empty = the conv alpha.",
        advanced=True,
    )
    network_weights: str = _f(
        "",
        "Start from LoRA",
        "A LoRA file in the LoRA folder (its name) to train on from: its type and dims are used. Empty = a new LoRA.",
        advanced=True,
    )
    loraplus_lr_ratio: float = _f(
        0.0,
        "LoRA+ ratio",
        "LoRA+: the up matrices learn this many times faster than the down ones (the paper and kohya suggest "
        "16); 0 = off. LoRA, LoCon and DoRA.",
        min=0.0,
        max=1000.0,
        advanced=True,
    )
    down_lr_weight: str = _f(
        "",
        "Down blocks LR weights",
        "12 numbers apart by commas, one per input block (IN00-IN11, kohya's): each block's learning rate times "
        "its number; 0 leaves the block out. Empty = 1 for all.",
        advanced=True,
    )
    mid_lr_weight: str = _f(
        "", "Mid block LR weight", "One number: the middle block's learning rate times it. Empty = 1.", advanced=True
    )
    up_lr_weight: str = _f(
        "",
        "Up blocks LR weights",
        "12 numbers apart by commas, one per output block (OUT00-OUT11): as the down blocks'. Empty = 1 for all.",
        advanced=True,
    )
    lr_scheduler: str = _f(
        "cosine_with_restarts",
        "LR scheduler",
        "How the learning rate changes over training.",
        ss="ss_lr_scheduler",
        choices=LR_SCHEDULERS,
        advanced=True,
    )
    lr_warmup_steps: int = _f(
        0,
        "LR warmup steps",
        "Steps at the start with a rising learning rate.",
        ss="ss_lr_warmup_steps",
        min=0,
        max=1_000_000,
        advanced=True,
    )
    enable_bucket: bool = _f(
        True,
        "Aspect ratio buckets",
        "Keep each picture's aspect ratio instead of cropping.",
        ss="ss_enable_bucket",
        advanced=True,
    )
    min_bucket_reso: int = _f(
        320,
        "Min bucket side",
        "Smallest bucket side in pixels.",
        ss="ss_min_bucket_reso",
        min=64,
        max=4096,
        advanced=True,
    )
    max_bucket_reso: int = _f(
        960,
        "Max bucket side",
        "Largest bucket side in pixels.",
        ss="ss_max_bucket_reso",
        min=64,
        max=8192,
        advanced=True,
    )
    caption_mode: str = _f(
        "use",
        "Uploaded captions",
        "What to do with a .txt caption uploaded beside an image: "
        "use it, ignore it, or put it before / after the automatic caption.",
        choices=CAPTION_MODES,
        advanced=True,
    )
    trigger_word: str = _f("", "Trigger word", "Put first in every caption; empty = the project name.", advanced=True)
    reg_caption: str = _f(
        "",
        "Class caption",
        "Caption of the regularisation (class) pictures that have no .txt "
        "of their own, e.g. 'a photo of a cat'; never gets the trigger word.",
        advanced=True,
    )
    prior_loss_weight: float = _f(
        1.0,
        "Prior loss weight",
        "How much the regularisation (class) pictures count in the loss; 1 = as much as the training pictures.",
        ss="ss_prior_loss_weight",
        min=0.0,
        max=100.0,
        advanced=True,
    )
    captioner: str = _f(
        "none",
        "Automatic captioner",
        "Caption pictures automatically when preparing: wd14 = booru tags (anime), blip = a short sentence "
        "(photos), deepbooru = the WebUI's own tagger (in the WebUI only); combined per 'Uploaded captions'.",
        choices=CAPTIONERS,
        advanced=True,
    )
    tagger_general_threshold: float = _f(
        0.35,
        "Tagger threshold",
        "WD14: general tags at least this confident are kept; lower = more tags.",
        min=0.0,
        max=1.0,
        advanced=True,
    )
    tagger_character_threshold: float = _f(
        0.85,
        "Tagger character threshold",
        "WD14: character names at least this confident are kept.",
        min=0.0,
        max=1.0,
        advanced=True,
    )
    tagger_include_rating: bool = _f(
        False,
        "Tagger rating tag",
        "WD14: also write the rating (general, sensitive, questionable, explicit).",
        advanced=True,
    )
    tagger_exclude: str = _f(
        "",
        "Tagger excluded tags",
        "WD14: comma-separated tags never written (e.g. the features every picture shares).",
        advanced=True,
    )
    background_color: str = _f(
        "#ffffff", "Background colour", "Transparent pixels are flattened onto this colour.", advanced=True
    )
    min_image_size: int = _f(
        64, "Min image side", "Pictures with a shorter side are refused as too small.", min=8, max=4096, advanced=True
    )
    bucket_no_upscale: bool = _f(
        True,
        "No upscaling",
        "Small pictures get a smaller bucket instead of being enlarged.",
        ss="ss_bucket_no_upscale",
        advanced=True,
    )
    flip_aug: bool = _f(
        False,
        "Flip augmentation",
        "Also train on mirrored copies (not for asymmetric subjects).",
        ss="ss_flip_aug",
        advanced=True,
    )
    shuffle_caption: bool = _f(
        False, "Shuffle caption", "Shuffle the comma-separated tags every step.", ss="ss_shuffle_caption", advanced=True
    )
    keep_tokens: int = _f(
        0,
        "Keep tokens",
        "With shuffle: the first n tags stay in place.",
        ss="ss_keep_tokens",
        min=0,
        max=225,
        advanced=True,
    )
    caption_dropout_rate: float = _f(
        0.0,
        "Caption dropout",
        "Share of steps that train a picture with an empty caption (the LoRA then also works without its words).",
        ss="ss_caption_dropout_rate",
        min=0.0,
        max=1.0,
        advanced=True,
    )
    caption_dropout_every_n_epochs: int = _f(
        0,
        "Caption dropout every n epochs",
        "Every n-th epoch trains every picture with an empty caption; 0 = never.",
        ss="ss_caption_dropout_every_n_epochs",
        min=0,
        max=10000,
        advanced=True,
    )
    caption_tag_dropout_rate: float = _f(
        0.0,
        "Tag dropout",
        "Chance of leaving out each comma-separated tag at a step (the first Keep tokens tags always stay).",
        ss="ss_caption_tag_dropout_rate",
        min=0.0,
        max=1.0,
        advanced=True,
    )
    max_token_length: int = _f(
        75,
        "Max token length",
        "Caption tokens seen by the text encoder (75, 150, 225).",
        ss="ss_max_token_length",
        min=75,
        max=225,
        advanced=True,
    )
    noise_offset: float = _f(
        0.0,
        "Noise offset",
        "Helps very dark or bright images; 0.05-0.1 typical.",
        ss="ss_noise_offset",
        min=0.0,
        max=1.0,
        advanced=True,
    )
    min_snr_gamma: float = _f(
        0.0,
        "Min SNR gamma",
        "Loss weighting; 5 is common, 0 = off.",
        ss="ss_min_snr_gamma",
        min=0.0,
        max=100.0,
        advanced=True,
    )
    v_parameterization: bool = _f(
        False,
        "V-prediction",
        "Train the v target (v-prediction models); on by itself for a checkpoint marked v_pred or SD2 768-v.",
        ss="ss_v_parameterization",
        advanced=True,
    )
    zero_terminal_snr: bool = _f(
        False,
        "Zero terminal SNR",
        "Rescale the noise schedule so the last step is pure noise; on by itself for a checkpoint marked ztsnr.",
        ss="ss_zero_terminal_snr",
        advanced=True,
    )
    scale_v_pred_loss_like_noise_pred: bool = _f(
        False,
        "Scale v loss like noise loss",
        "With v-prediction: weight each step's loss by SNR / (SNR + 1), as an epsilon loss would weigh it.",
        ss="ss_scale_v_pred_loss_like_noise_pred",
        advanced=True,
    )
    loss_type: str = _f(
        "l2",
        "Loss type",
        "l2 (squared error, the usual), l1, or huber / smooth_l1: like l2 for small errors, like l1 for large "
        "ones, so odd pictures pull less.",
        ss="ss_loss_type",
        choices=LOSS_TYPES,
        advanced=True,
    )
    masked_loss: bool = _f(
        False,
        "Masked loss",
        "Learn only where a picture is opaque (its alpha channel) or white in its mask picture (name.mask.png "
        "uploaded beside name.png); pictures without either are learned whole.",
        ss="ss_masked_loss",
        advanced=True,
    )
    huber_c: float = _f(
        0.1,
        "Huber c",
        "Where huber / smooth_l1 turn from l2 into l1 (kohya's default 0.1).",
        ss="ss_huber_c",
        min=0.0001,
        max=10.0,
        advanced=True,
    )
    huber_schedule: str = _f(
        "snr",
        "Huber schedule",
        "How huber c changes with the noise level: snr (larger at low noise, kohya's default), exponential, constant.",
        ss="ss_huber_schedule",
        choices=HUBER_SCHEDULES,
        advanced=True,
    )
    debiased_estimation_loss: bool = _f(
        False,
        "Debiased estimation loss",
        "Weight each step's loss by 1 / sqrt(SNR) (1 / (SNR + 1) for v-prediction), as kohya's option does.",
        ss="ss_debiased_estimation",
        advanced=True,
    )
    min_timestep: int = _f(
        0, "Min timestep", "Lowest noise step trained (0-999).", ss="ss_min_timestep", min=0, max=999, advanced=True
    )
    max_timestep: int = _f(
        1000,
        "Max timestep",
        "Noise steps below this are trained (1-1000); e.g. 0-500 trains only details.",
        ss="ss_max_timestep",
        min=1,
        max=1000,
        advanced=True,
    )
    ip_noise_gamma: float = _f(
        0.0,
        "Input perturbation noise",
        "Extra noise on the noisy input only (not the target), 0.1 typical; 0 = off.",
        ss="ss_ip_noise_gamma",
        min=0.0,
        max=1.0,
        advanced=True,
    )
    multires_noise_iterations: int = _f(
        0,
        "Multires noise iterations",
        "Pyramid noise: add lower-resolution noise this many times (6-10 typical); 0 = off.",
        ss="ss_multires_noise_iterations",
        min=0,
        max=20,
        advanced=True,
    )
    multires_noise_discount: float = _f(
        0.3,
        "Multires noise discount",
        "How much each coarser level of the pyramid noise counts (0.1-0.3).",
        ss="ss_multires_noise_discount",
        min=0.0,
        max=1.0,
        advanced=True,
    )
    adaptive_noise_scale: float = _f(
        0.0,
        "Adaptive noise scale",
        "With noise offset: add this times each picture's mean latent to the offset; 0 = off.",
        ss="ss_adaptive_noise_scale",
        min=-1.0,
        max=1.0,
        advanced=True,
    )
    max_grad_norm: float = _f(
        1.0, "Max grad norm", "Gradient clipping; 0 = off.", ss="ss_max_grad_norm", min=0.0, max=1000.0, advanced=True
    )
    gradient_checkpointing: bool = _f(
        False, "Gradient checkpointing", "Less VRAM, about 20% slower.", ss="ss_gradient_checkpointing", advanced=True
    )
    cache_latents: bool = _f(
        True, "Cache latents", "Encode each image once instead of every step.", ss="ss_cache_latents", advanced=True
    )
    torch_compile: bool = _f(
        False,
        "torch.compile",
        "Compile the UNet: faster steps on a GPU after a minute "
        "or more of compiling at the start; needs a C++ compiler.",
        advanced=True,
    )
    save_precision: str = _f(
        "fp16", "Save precision", "Precision of the saved LoRA file.", choices=SAVE_PRECISIONS, advanced=True
    )
    output_name: str = _f(
        "", "Output name", "File name of the LoRA; empty = <project>-<version>.", ss="ss_output_name", advanced=True
    )
    # --- previews (pictures made with the saved LoRA files) ---
    preview_at_end: bool = _f(
        False,
        "Previews at the end",
        "After training, make the preview grid: one row per saved epoch, one column per LoRA weight.",
        advanced=True,
    )
    sample_every_n_epochs: int = _f(
        0,
        "Sample every n epochs",
        "Make a few sample pictures with each saved LoRA file every n epochs, to watch training; 0 = off.",
        min=0,
        max=10000,
        advanced=True,
    )
    preview_prompt: str = _f(
        "", "Preview prompt", "Prompt of the previews and samples; empty = the trigger word.", advanced=True
    )
    log_with: str = _f(
        "tensorboard",
        "Log with",
        "tensorboard: the loss, learning rate and samples in <run>/logs, for 'tensorboard --logdir'; none = no logs.",
        choices=LOGGERS,
        advanced=True,
    )
    validation_split: float = _f(
        0.0,
        "Validation split",
        "Share of the pictures held out of training; their loss (fixed noise and timesteps) is shown beside the "
        "training loss. 0 = none.",
        min=0.0,
        max=0.5,
        advanced=True,
    )
    validate_every_n_epochs: int = _f(
        1,
        "Validate every n epochs",
        "How often the held-out pictures' loss is computed.",
        min=1,
        max=10000,
        advanced=True,
    )

    # ------------------------------------------------------------------ derived values
    def effective_unet_lr(self) -> float:
        return self.unet_lr or self.learning_rate

    def effective_text_encoder_lr(self) -> float:
        return self.text_encoder_lr or self.learning_rate

    def conv_rank(self) -> tuple[int, float] | None:
        """(dim, alpha) of the 3x3 convolutions, or None when they are not adapted.

        ``conv_dim`` > 0 turns them on for every type (kohya's LoRA with conv_dim is LoCon); "locon" without a
        conv dim uses the network's dim and alpha (what LyCORIS does when conv_dim is not given).
        """
        if self.conv_dim > 0:
            return self.conv_dim, self.conv_alpha
        if self.network_type == "locon":
            return self.network_dim, self.network_alpha
        return None


def fields_info() -> list[dataclasses.Field]:
    """The settings fields in display order, for building the CLI help and the tab."""
    return list(dataclasses.fields(TrainConfig))
