"""What a run trains on: the model file (the tiny demo model, or the full architecture with random weights,
built once), the generated pictures and their version, the run's settings and its number of steps, and a
stand-in tokenizer where no CLIP tokenizer is found offline."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..errors import UserError
from .presets import BenchSpec

log = logging.getLogger(__name__)


def ensure_checkpoint(family: str, size: str, folder: Path, device: str) -> Path:
    """The model file a run trains on: the tiny demo model, or the full architecture with random weights
    (fp16, as published checkpoints are), built once and kept in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if size == "tiny":
        from ..models.demo_model import build_demo_checkpoint

        path = folder / f"demo-{family}.safetensors"
        return path if path.is_file() else build_demo_checkpoint(path, family=family)
    path = folder / f"random-{family}-full.safetensors"
    if path.is_file():
        return path
    from safetensors.torch import save_file

    from ..fileio import write_with
    from ..models.configs import build_text_encoders, build_unet, build_vae, spec
    from ..models.convert import components_from_models, diffusers_to_original

    log.info("Building a full-size %s model with random weights (once; kept as %s)", family, path)
    model_spec = spec(family)
    build_on = torch.device("cuda") if device.startswith("cuda") else torch.device("cpu")
    with torch.random.fork_rng(devices=[]), build_on:  # initialising ~1-3 B weights is much faster on a GPU
        torch.manual_seed(0)
        unet, vae, tes = build_unet(model_spec), build_vae(model_spec), build_text_encoders(model_spec)
    original = diffusers_to_original(components_from_models(unet, vae, tes), model_spec)
    tensors = {k: (v.half() if v.is_floating_point() else v).cpu().contiguous() for k, v in original.items()}
    del unet, vae, tes, original
    write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt", "train_tools_bench": family}))
    return path


def make_pictures(folder: Path, resolution: int, count: int) -> Path:
    """``count`` square pictures of ``resolution`` pixels (seeded noise over a gradient), each with a caption."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(resolution)
    ramp = torch.linspace(0, 255, resolution).view(1, resolution, 1).expand(resolution, resolution, 3)
    for i in range(count):
        noise = torch.randint(0, 96, (resolution, resolution, 3), generator=gen)
        pixels = ((ramp * (i + 1) / count + noise) % 256).to(torch.uint8).numpy()
        Image.fromarray(pixels, "RGB").save(folder / f"bench_{i:03d}.png")
        (folder / f"bench_{i:03d}.txt").write_text(
            f"a photo of a test pattern, number {i}, high quality", encoding="utf-8"
        )
    return folder


def plan(spec: BenchSpec) -> tuple[int, int, int]:
    """(pictures, repeats, total steps): one bucket, one epoch of at least warm-up + timed + phase steps."""
    pictures = 2 * spec.batch
    wanted = spec.warmup + spec.steps + spec.phase_steps
    repeats = math.ceil(wanted / 2)  # each repeat of the 2 x batch pictures is 2 batches
    return pictures, repeats, 2 * repeats


def bench_config(spec: BenchSpec, repeats: int) -> TrainConfig:
    return TrainConfig(
        resolution=spec.resolution,
        min_bucket_reso=64,
        max_bucket_reso=max(spec.resolution * 2, 256),
        batch_size=spec.batch,
        repeats=repeats,
        epochs=1,
        save_every_n_epochs=1,
        optimizer=spec.optimizer,
        mixed_precision=spec.mixed_precision,
        gradient_checkpointing=spec.gradient_checkpointing,
        train_text_encoder=spec.train_text_encoder,
        network_type=spec.network_type,
        network_dim=spec.network_dim,
        network_alpha=spec.network_dim / 2,
        lr_scheduler="constant",
        torch_compile=spec.compile,
        save_precision="fp16",
        seed=0,
    )


@contextlib.contextmanager
def offline_tokenizer_fallback() -> Iterator[None]:
    """Full-size models need the real 49408-token CLIP tokenizer; where none is found offline, the benchmark
    uses a stand-in of the same size (its captions tokenize differently, a step costs the same)."""
    from ..models import loader, tokenizers

    real = loader.tokenizer_for

    def tokenizer_for(
        vocab_size: int, pad_token: str = tokenizers.EOS, kind: str = "clip-l", tokenizer_dir: Path | None = None
    ) -> Any:
        try:
            return real(vocab_size, pad_token, kind, tokenizer_dir)
        except UserError:
            if vocab_size != tokenizers.REAL_VOCAB_SIZE:
                raise
            log.warning("No CLIP tokenizer is available offline; benchmarking with a stand-in vocabulary.")
            return _stand_in_tokenizer(pad_token)

    loader.tokenizer_for = tokenizer_for
    try:
        yield
    finally:
        loader.tokenizer_for = real


def _stand_in_tokenizer(pad_token: str) -> Any:
    """A 49408-token byte-level BPE vocabulary made of two-character merges, by the CLIP vocabulary rule."""
    from ..models import tokenizers

    chars = list(tokenizers.bytes_to_unicode().values())
    merges = [(a, b + "</w>") for a in chars for b in chars][: tokenizers.REAL_MERGE_COUNT]
    folder = tokenizers._write_tokenizer_files(tokenizers.vocab_from_merges(merges), merges, None)
    return tokenizers._from_folder(folder, pad_token)


def make_version(run_dir: Path, spec: BenchSpec) -> Any:
    from ..data.uploads import add_originals
    from ..store import Store

    pictures, _, _ = plan(spec)
    store = Store(run_dir / "data")
    store.create_project("bench")
    version = store.create_version("bench", "v1")
    report = add_originals([make_pictures(run_dir / "pictures", spec.resolution, pictures)], version.originals_dir)
    if sum(1 for path in report.added if path.suffix == ".png") != pictures:
        raise UserError(f"The benchmark pictures could not be added: {report.summary()}")
    return version
