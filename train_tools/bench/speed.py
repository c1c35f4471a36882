"""``python -m train_tools.bench.speed``: how fast the trainer trains, and how far it is from the bare UNet.

Each run trains a fresh version of generated square pictures with the real ``Trainer`` (the same code as the
tab and the command line) and prints one table:

* steps/s and images/s in steady state (after a few warm-up steps), the median and slowest step;
* the time to the first step, model loading and latent caching included;
* peak memory: torch's max allocated/reserved on a GPU, the process's peak RSS on the CPU;
* a per-phase breakdown of a step (data, text encoder, UNet forward, backward, optimizer), taken over a few
  extra steps with the phases timed one by one (synchronising the GPU at each boundary, so these steps are
  not part of the steady-state figure);
* the bound: the same UNet (with the same LoRA, precision and checkpointing) doing only forward + backward,
  one step of it between every two timed training steps,
  on the same inputs, and the trainer's step time over it, which is the trainer's overhead;
* on a GPU, the model FLOPs of a step (``torch.utils.flop_counter``, without the recomputation of gradient
  checkpointing) and the achieved fraction of the GPU's dense bf16/fp16 peak (MFU) when the GPU is known.

Models: ``tiny`` is the demo model (a second to build, runs on a CPU); ``full`` is the published
architecture with random weights (no download), written once to the work folder and reused.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import logging
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import OPTIMIZERS, TrainConfig
from ..errors import UserError
from ..progress import Reporter, StepInfo

log = logging.getLogger(__name__)

PRESETS = ("cpu-tiny", "gpu-sd15", "gpu-sdxl")
FAMILIES = ("sd1", "sd2", "sdxl")
PHASES = ("data", "text encoder", "UNet forward", "backward", "optimizer")

# Dense (no sparsity) bf16/fp16 tensor-core peaks with fp32 accumulation, in TFLOPS, from the vendors'
# data sheets: (substrings the device name must hold, substrings it must not hold, label, TFLOPS).
PEAK_TFLOPS: tuple[tuple[tuple[str, ...], tuple[str, ...], str, float], ...] = (
    (("H100", "PCIE"), (), "H100 PCIe", 756.0),
    (("H100",), ("NVL", "PCIE"), "H100 SXM", 989.0),
    (("H200",), ("NVL",), "H200", 989.0),
    (("A100",), (), "A100", 312.0),
    (("L40S",), (), "L40S", 362.0),
    (("RTX 4090",), (), "RTX 4090", 165.0),
    (("RTX 3090",), ("TI",), "RTX 3090", 71.0),
)


def peak_tflops(device_name: str) -> tuple[str, float] | None:
    """(label, dense bf16 TFLOPS) of a known GPU, or None: an unknown GPU gets no MFU rather than a guess."""
    name = device_name.upper()
    for needed, excluded, label, tflops in PEAK_TFLOPS:
        if all(n in name for n in needed) and not any(x in name for x in excluded):
            return label, tflops
    return None


# ---------------------------------------------------------------------------------------------- what to run
@dataclass(frozen=True)
class BenchSpec:
    """One benchmark run."""

    family: str = "sd1"
    size: str = "tiny"  # "tiny" (demo model) or "full" (published architecture, random weights)
    resolution: int = 128
    batch: int = 2
    gradient_checkpointing: bool = False
    optimizer: str = field(default_factory=lambda: TrainConfig().optimizer)  # the tab's default
    mixed_precision: str = "no"
    steps: int = 20
    warmup: int = 3
    phase_steps: int = 10
    compile: bool = False
    channels_last: bool = False
    train_text_encoder: bool = False
    network_dim: int = 128
    flat: bool = True  # LoRA weights laid out flat for the optimizers that allow it (flat_params.py)
    device: str = "cpu"

    @property
    def title(self) -> str:
        parts = [f"{self.family} {self.size}", f"{self.resolution}x{self.resolution}", f"batch {self.batch}",
                 _precision_label(self.mixed_precision),
                 f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}", self.optimizer]
        parts += [flag for flag, on in (("torch.compile", self.compile), ("channels_last", self.channels_last),
                                        ("text encoder trained", self.train_text_encoder),
                                        ("LoRA weights as separate tensors", not self.flat)) if on]
        return " · ".join(parts)


def preset_specs(preset: str, device: str) -> list[BenchSpec]:
    """The runs of a preset: the CPU one, SD1.5 at 512 (batch 1/4, checkpointing off/on, and batch 1 with
    checkpointing and AdamW8bit), SDXL at 1024."""
    gpu_precision = _gpu_precision() if device.startswith("cuda") else "no"
    if preset == "cpu-tiny":
        return [BenchSpec(family="sd1", size="tiny", resolution=128, batch=2, device=device, steps=20)]
    if preset == "gpu-sd15":
        runs = [BenchSpec(family="sd1", size="full", resolution=512, batch=b, gradient_checkpointing=gc_on,
                          mixed_precision=gpu_precision, device=device, steps=30)
                for b in (1, 4) for gc_on in (False, True)]
        # The low-VRAM set-up the memory target is about: batch 1, checkpointing, an 8-bit optimizer.
        return runs + [dataclasses.replace(runs[1], optimizer="AdamW8bit")]
    if preset == "gpu-sdxl":
        return [BenchSpec(family="sdxl", size="full", resolution=1024, batch=b, gradient_checkpointing=gc_on,
                          mixed_precision=gpu_precision, device=device, steps=20)
                for b, gc_on in ((1, False), (1, True), (4, True))]
    raise UserError(f"Unknown preset '{preset}'; choose one of {', '.join(PRESETS)}.")


def _gpu_precision() -> str:
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"


def _precision_label(mixed_precision: str) -> str:
    return "fp32" if mixed_precision == "no" else f"{mixed_precision} autocast"


def apply_overrides(specs: list[BenchSpec], overrides: dict[str, Any]) -> list[BenchSpec]:
    """The preset's runs with the flags given on the command line; runs that become equal are run once."""
    out: list[BenchSpec] = []
    for spec in specs:
        changed = dataclasses.replace(spec, **overrides)
        if changed not in out:
            out.append(changed)
    return out


# ---------------------------------------------------------------------------------------------- results
@dataclass
class BenchResult:
    spec: BenchSpec
    device_name: str = ""
    step_s: float = math.nan  # steady-state mean
    step_median_s: float = math.nan
    step_max_s: float = math.nan
    first_step_s: float = math.nan
    load_s: float = math.nan
    latents_s: float = math.nan
    text_cache_s: float = math.nan
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    peak_rss: int | None = None
    phases_ms: dict[str, float] = field(default_factory=dict)
    instrumented_step_ms: float = math.nan
    phase_steps_run: int = 0
    bare_step_s: float = math.nan  # mean
    bare_median_s: float = math.nan
    flops_per_step: float | None = None
    peak: tuple[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def steps_per_s(self) -> float:
        return 1.0 / self.step_s if self.step_s > 0 else math.nan

    @property
    def images_per_s(self) -> float:
        return self.steps_per_s * self.spec.batch

    @property
    def overhead(self) -> float:
        """Median trainer step over median bare step: medians, so one slow step (another process, a page
        fault) moves neither."""
        return self.step_median_s / self.bare_median_s if self.bare_median_s > 0 else math.nan

    def mfu(self, step_s: float) -> float | None:
        if self.flops_per_step is None or self.peak is None or not step_s > 0:
            return None
        return self.flops_per_step / step_s / (self.peak[1] * 1e12)


# ---------------------------------------------------------------------------------------------- set-up
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

    from ..models.convert import components_from_models, diffusers_to_original
    from ..fileio import write_with
    from ..models.configs import build_text_encoders, build_unet, build_vae, spec

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
        (folder / f"bench_{i:03d}.txt").write_text(f"a photo of a test pattern, number {i}, high quality",
                                                   encoding="utf-8")
    return folder


def plan(spec: BenchSpec) -> tuple[int, int, int]:
    """(pictures, repeats, total steps): one bucket, one epoch of at least warm-up + timed + phase steps."""
    pictures = 2 * spec.batch
    wanted = spec.warmup + spec.steps + spec.phase_steps
    repeats = math.ceil(wanted / 2)  # each repeat of the 2 x batch pictures is 2 batches
    return pictures, repeats, 2 * repeats


def bench_config(spec: BenchSpec, repeats: int) -> TrainConfig:
    return TrainConfig(
        resolution=spec.resolution, min_bucket_reso=64, max_bucket_reso=max(spec.resolution * 2, 256),
        batch_size=spec.batch, repeats=repeats, epochs=1, save_every_n_epochs=1, optimizer=spec.optimizer,
        mixed_precision=spec.mixed_precision, gradient_checkpointing=spec.gradient_checkpointing,
        train_text_encoder=spec.train_text_encoder, network_dim=spec.network_dim,
        network_alpha=spec.network_dim / 2, lr_scheduler="constant", torch_compile=spec.compile,
        save_precision="fp16", seed=0)


@contextlib.contextmanager
def offline_tokenizer_fallback() -> Iterator[None]:
    """Full-size models need the real 49408-token CLIP tokenizer; where none is found offline, the benchmark
    uses a stand-in of the same size (its captions tokenize differently, a step costs the same)."""
    from ..models import loader, tokenizers

    real = loader.tokenizer_for

    def tokenizer_for(vocab_size: int, pad_token: str = tokenizers.EOS, kind: str = "clip-l",
                      tokenizer_dir: Path | None = None) -> Any:
        try:
            return real(vocab_size, pad_token, kind, tokenizer_dir)
        except UserError:
            if vocab_size != tokenizers.REAL_VOCAB_SIZE:
                raise
            log.warning("No CLIP tokenizer is available offline; benchmarking with a stand-in vocabulary.")
            return _stand_in_tokenizer(pad_token)

    loader.tokenizer_for = tokenizer_for  # type: ignore[assignment]
    try:
        yield
    finally:
        loader.tokenizer_for = real  # type: ignore[assignment]


def _stand_in_tokenizer(pad_token: str) -> Any:
    """A 49408-token byte-level BPE vocabulary made of two-character merges, by the CLIP vocabulary rule."""
    from ..models import tokenizers

    chars = list(tokenizers.bytes_to_unicode().values())
    merges = [(a, b + "</w>") for a in chars for b in chars][: tokenizers.REAL_MERGE_COUNT]
    folder = tokenizers._write_tokenizer_files(tokenizers.vocab_from_merges(merges), merges, None)
    return tokenizers._from_folder(folder, pad_token)


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Times named phases by wrapping the methods the training step calls (on the instances only, so the
    trainer's code is unchanged); ``restore`` puts the originals back."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._patched: list[tuple[Any, str, bool, Any]] = []

    def wrap(self, obj: Any, name: str, phase: str) -> None:
        original = getattr(obj, name)
        own = name in vars(obj)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            _sync(self.device)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                _sync(self.device)
                self.totals[phase] += time.perf_counter() - start

        setattr(obj, name, timed)
        self._patched.append((obj, name, own, vars(obj).get(name) if own else None))

    def install(self, trainer: Any) -> None:
        for name in ("latents_for", "sample_noise", "sample_timesteps"):
            self.wrap(trainer, name, "data")
        self.wrap(trainer, "text_for", "text encoder")
        self.wrap(trainer, "loss", "UNet forward")
        self.wrap(trainer.accelerator, "backward", "backward")
        self.wrap(trainer, "clip_gradients", "optimizer")
        self.wrap(trainer, "optimizer_step", "optimizer")
        self.wrap(trainer.optimizer, "zero_grad", "optimizer")
        self.wrap(trainer.lr_scheduler, "step", "optimizer")

    def restore(self) -> None:
        for obj, name, own, original in reversed(self._patched):
            if own:
                setattr(obj, name, original)
            else:
                vars(obj).pop(name, None)
        self._patched.clear()


class BenchReporter(Reporter):
    """Stamps every step, switches the phase timers on after the timed steps."""

    def __init__(self, on_step: Callable[[int], None]) -> None:
        self.stamps: list[float] = []  # when each step ended
        self.resumed: list[float] = []  # when the trainer got control back after it (``on_step`` excluded)
        self.on_step = on_step

    def start(self, total_steps: int, total_epochs: int) -> None:
        log.debug("Training %d steps", total_steps)

    def step(self, info: StepInfo) -> None:
        self.stamps.append(time.perf_counter())
        self.on_step(info.step)
        self.resumed.append(time.perf_counter())

    def step_seconds(self, step: int) -> float:
        """Seconds of training step ``step`` (1-based) alone, without what ``on_step`` did before it."""
        return self.stamps[step - 1] - self.resumed[step - 2]

    def saved(self, path: Path, epoch: int) -> None:
        log.debug("saved %s", path.name)

    def message(self, text: str) -> None:
        log.debug("%s", text)


def _timing(original: Callable[..., Any], sink: list[float]) -> Callable[..., Any]:
    """``original`` that appends the seconds of each call to ``sink``."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - start)

    return timed


@contextlib.contextmanager
def _timed_function(module: Any, name: str, sink: list[float]) -> Iterator[None]:
    """Time every call of ``module.name`` (a module-level function looked up at call time)."""
    original = getattr(module, name)
    setattr(module, name, _timing(original, sink))
    try:
        yield
    finally:
        setattr(module, name, original)


def _timed_method(obj: Any, name: str, sink: list[float]) -> None:
    setattr(obj, name, _timing(getattr(obj, name), sink))


# ---------------------------------------------------------------------------------------------- one run
def run_one(spec: BenchSpec, work_dir: Path, *, keep: bool = False) -> BenchResult:
    """Train ``spec`` with the real trainer and measure it; errors a user can meet become the result's error."""
    result = BenchResult(spec)
    device = torch.device(spec.device)
    result.device_name = _device_name(device)
    result.peak = peak_tflops(result.device_name) if device.type == "cuda" else None
    ckpt = ensure_checkpoint(spec.family, spec.size, work_dir / "models", spec.device)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work_dir))
    try:
        version = _make_version(run_dir, spec)
        with offline_tokenizer_fallback():
            _measure(spec, version, ckpt, device, result)
    except UserError as exc:
        result.error = str(exc)
    except (RuntimeError, MemoryError) as exc:
        from ..training.memory import is_out_of_memory

        if not is_out_of_memory(exc):
            raise
        result.error = f"out of memory ({str(exc).splitlines()[0][:160]})"
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
    return f"{platform.processor() or platform.machine() or 'CPU'}, {torch.get_num_threads()} threads"


def _make_version(run_dir: Path, spec: BenchSpec) -> Any:
    from ..data.dataset import add_originals
    from ..store import Store

    pictures, _, _ = plan(spec)
    store = Store(run_dir / "data")
    store.create_project("bench")
    version = store.create_version("bench", "v1")
    report = add_originals([make_pictures(run_dir / "pictures", spec.resolution, pictures)], version.originals_dir)
    if sum(1 for path in report.added if path.suffix == ".png") != pictures:
        raise UserError(f"The benchmark pictures could not be added: {report.summary()}")
    return version


def _measure(spec: BenchSpec, version: Any, ckpt: Path, device: torch.device, result: BenchResult) -> None:
    from ..models import loader
    from ..training.trainer import Trainer

    _, repeats, total = plan(spec)
    timed_end = spec.warmup + spec.steps
    timer = PhaseTimer(device)
    trainer_box: list[Any] = []

    bare: list[float] = []

    def on_step(step: int) -> None:
        # Between two training steps, one bare UNet step on the inputs of the step just done: the bound is
        # measured interleaved with the steps it bounds, so both see the same machine (on a shared CPU the
        # load moves by more than the overhead between a run and one taken after it).
        if step < timed_end:
            seconds = bare_step_between(trainer_box[0], captured["args"], device)
            if step >= spec.warmup:
                bare.append(seconds)
        elif step == timed_end:
            timer.install(trainer_box[0])

    reporter = BenchReporter(on_step)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    load_times: list[float] = []
    latent_times: list[float] = []
    text_times: list[float] = []
    start = time.perf_counter()
    trainer = Trainer(version, bench_config(spec, repeats), ckpt, reporter=reporter, device=spec.device,
                      run_name="bench")
    trainer.flat_layout = spec.flat
    trainer_box.append(trainer)
    captured: dict[str, Any] = {}
    original_loss = trainer.loss

    def loss(*args: Any, **kwargs: Any) -> torch.Tensor:
        captured["args"] = args  # the last step's inputs, for the bare UNet bound
        return original_loss(*args, **kwargs)

    trainer.loss = loss  # type: ignore[method-assign]
    _timed_method(trainer, "cache_latents", latent_times)
    _timed_method(trainer, "cache_text", text_times)
    if spec.channels_last:
        _channels_last_after_prepare(trainer)
    try:
        with _timed_function(loader, "load_model", load_times):
            trainer.run()
    finally:
        timer.restore()
    # The training run's peak: read before the bound and the FLOP count (done without checkpointing) run.
    if device.type == "cuda":
        result.peak_allocated = torch.cuda.max_memory_allocated(device)
        result.peak_reserved = torch.cuda.max_memory_reserved(device)
    else:
        result.peak_rss = peak_rss()
    stamps = reporter.stamps
    if len(stamps) < total:
        raise UserError(f"The benchmark run stopped after {len(stamps)} of {total} steps.")
    result.first_step_s = stamps[0] - start
    result.load_s = sum(load_times)
    result.latents_s = sum(latent_times)
    result.text_cache_s = sum(text_times)
    steady = [reporter.step_seconds(step) for step in range(spec.warmup + 1, timed_end + 1)]
    result.step_s = statistics.fmean(steady)
    result.step_median_s = statistics.median(steady)
    result.step_max_s = max(steady)
    phase_steps = result.phase_steps_run = total - timed_end
    result.instrumented_step_ms = (stamps[-1] - stamps[timed_end - 1]) / phase_steps * 1000
    result.phases_ms = {name: seconds / phase_steps * 1000 for name, seconds in timer.totals.items()}

    result.bare_step_s, result.bare_median_s = statistics.fmean(bare), statistics.median(bare)
    unet = trainer.accelerator.unwrap_model(trainer.model.unet)
    inputs = _bare_inputs(captured["args"], trainer.weight_dtype)
    try:
        result.flops_per_step = count_flops(unet, inputs, trainer.accelerator.autocast, trainer.trainable)
    except (RuntimeError, NotImplementedError) as exc:  # an op the counter cannot follow: no FLOPs, no MFU
        result.notes.append(f"FLOPs not counted: {str(exc).splitlines()[0][:120]}")
    if not spec.train_text_encoder:
        result.notes.append("text encoder frozen: its outputs are cached before the first step")
    trainer.release_memory()


def _channels_last_after_prepare(trainer: Any) -> None:
    from ..training.flat_params import views_intact

    original = trainer.prepare

    def prepare() -> None:
        original()
        # The frozen weights only: the LoRA weights stay views of their flat tensors (flat_params.py), which
        # are laid out in the weights' logical order anyway.
        kept = [(p, p.data, p.grad.data if p.grad is not None else None) for p in trainer.trainable]
        trainer.accelerator.unwrap_model(trainer.model.unet).to(memory_format=torch.channels_last)
        for p, data, grad in kept:
            p.data = data
            if grad is not None:
                p.grad.data = grad
        if trainer.flat and not all(views_intact(f) for f in trainer.optimized):
            raise RuntimeError("channels_last moved a LoRA weight out of its flat tensor.")

    trainer.prepare = prepare


@dataclass
class BareInputs:
    noisy: torch.Tensor
    timesteps: torch.Tensor
    hidden: torch.Tensor
    added: dict[str, torch.Tensor] | None
    target: torch.Tensor

    def first(self, n: int) -> BareInputs:
        added = {k: v[:n] for k, v in self.added.items()} if self.added else None
        return BareInputs(self.noisy[:n], self.timesteps[:n], self.hidden[:n], added, self.target[:n])


def _bare_inputs(args: Sequence[Any], dtype: torch.dtype) -> BareInputs:
    """The UNet's inputs of the trainer's last step (latents, text, noise, timesteps)."""
    latents, text, noise, timesteps = args[:4]
    hidden = getattr(text, "hidden", text)
    added = text.added_cond_kwargs(dtype) if hasattr(text, "added_cond_kwargs") else None
    added = {k: v.detach() for k, v in added.items()} if added else None  # no graph back into a trained encoder
    return BareInputs(latents.detach().to(dtype), timesteps.detach(), hidden.detach().to(dtype), added,
                      noise.detach())


def _bare_step(unet: torch.nn.Module, x: BareInputs, autocast: Callable[[], Any],
               forward: Callable[..., Any] | None = None) -> None:
    """One UNet forward + backward on ``x``; the gradients it leaves are the caller's to clear."""
    with autocast():
        pred = (forward or unet)(x.noisy, x.timesteps, x.hidden, added_cond_kwargs=x.added).sample
    F.mse_loss(pred.float(), x.target.float()).backward()
    del pred  # the graph's nodes are freed here, as the trainer frees its own within its step


def bare_step_between(trainer: Any, args: Sequence[Any], device: torch.device) -> float:
    """Seconds of one UNet forward + backward alone on ``args`` (a training step's inputs): no data, no text
    encoder, no optimizer, no bookkeeping. Run between two training steps, it leaves no trace on the next:
    the gradients it made are cleared as the trainer clears its own (in place when they are flat), and the
    weights are not touched.

    Synchronised at the end, as the trainer is (it reads the loss of every step).
    """
    unet = trainer.accelerator.unwrap_model(trainer.model.unet)
    inputs = _bare_inputs(args, trainer.weight_dtype)
    _sync(device)
    start = time.perf_counter()
    _bare_step(unet, inputs, trainer.accelerator.autocast)
    _sync(device)
    seconds = time.perf_counter() - start
    if trainer.flat:
        for flat in trainer.optimized:
            flat.grad.zero_()
    else:
        for p in trainer.trainable:
            p.grad = None
    return seconds


def count_flops(unet: torch.nn.Module, x: BareInputs, autocast: Callable[[], Any],
                params: Sequence[torch.nn.Parameter]) -> float:
    """Model FLOPs of one UNet forward + backward at the run's batch size.

    Counted at batch 1 and scaled (every op of the UNet is linear in the batch), without gradient
    checkpointing (its recomputation is extra work, not model FLOPs) and outside torch.compile.
    """
    from torch.utils.flop_counter import FlopCounterMode

    checkpointing = bool(getattr(unet, "is_gradient_checkpointing", False))
    if checkpointing:
        unet.disable_gradient_checkpointing()
    try:
        with FlopCounterMode(display=False) as counter:
            _bare_step(unet, x.first(1), autocast, forward=unet.forward)
        for p in params:
            p.grad = None
    finally:
        if checkpointing:
            unet.enable_gradient_checkpointing()
    return float(counter.get_total_flops()) * x.noisy.shape[0]


def peak_rss() -> int | None:
    """The process's peak resident memory in bytes (Linux/macOS), None where the OS does not say."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# ---------------------------------------------------------------------------------------------- output
def _dtype_label(mixed_precision: str) -> str:
    if mixed_precision == "no":
        return "fp32 (frozen weights and LoRA weights)"
    return f"{mixed_precision} autocast, frozen weights {mixed_precision}, LoRA weights fp32"


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def _num(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _flops(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} FLOP"


def format_result(r: BenchResult) -> str:
    """One Markdown table (and the phase table) for a run."""
    s = r.spec
    lines = [f"### {s.title}", ""]
    if r.error is not None:
        return "\n".join(lines + [f"Not measured: {r.error}", ""])
    rows: list[tuple[str, str]] = [
        ("device", f"{r.device_name} ({s.device})"),
        ("dtype", _dtype_label(s.mixed_precision)),
        ("resolution", f"{s.resolution}x{s.resolution}"),
        ("batch size", str(s.batch)),
        ("steps/s (steady state)", _num(r.steps_per_s, 3)),
        ("images/s", _num(r.images_per_s, 3)),
        ("step time mean / median / max", (f"{_num(r.step_s * 1000, 1)} / {_num(r.step_median_s * 1000, 1)} / "
                                           f"{_num(r.step_max_s * 1000, 1)} ms over {s.steps} steps")),
        ("time to first step", (f"{_num(r.first_step_s, 2)} s (model load {_num(r.load_s, 2)} s, latent caching "
                                f"{_num(r.latents_s, 2)} s, text caching {_num(r.text_cache_s, 2)} s)")),
    ]
    if r.peak_allocated is not None:
        rows.append(("peak memory", f"GPU {_gib(r.peak_allocated)} allocated, {_gib(r.peak_reserved)} reserved"))
    else:
        rows.append(("peak memory", f"process RSS {_gib(r.peak_rss)}"))
    rows += [
        ("bare UNet fwd+bwd (bound)", (f"{_num(r.bare_step_s * 1000, 1)} / {_num(r.bare_median_s * 1000, 1)} ms "
                                       "mean / median")),
        ("trainer overhead", (f"{_num(r.overhead, 3)}x the bound, median step over median bare step "
                              f"({_num((r.overhead - 1) * 100, 1)}% over)")),
        ("model FLOPs/step", f"{_flops(r.flops_per_step)} (UNet fwd+bwd, no recomputation)"),
    ]
    mfu, bare_mfu = r.mfu(r.step_s), r.mfu(r.bare_step_s)
    if mfu is not None and bare_mfu is not None and r.peak is not None:
        rows.append(("MFU", (f"{mfu * 100:.1f}% (bare UNet {bare_mfu * 100:.1f}%) of {r.peak[1]:g} TFLOPS "
                             f"({r.peak[0]}, dense bf16/fp16)")))
    elif s.device.startswith("cuda"):
        rows.append(("MFU", "n/a (peak rate of this GPU unknown)"))
    lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    total = r.instrumented_step_ms
    lines += [(f"Step phases (over {r.phase_steps_run} more steps, timed phase by phase with a sync at each "
               "boundary):"), "",
              "| phase | ms/step | share |", "|---|---|---|"]
    other = total - sum(r.phases_ms.values())
    for name, ms in [*r.phases_ms.items(), ("other (bookkeeping, logging)", other)]:
        lines.append(f"| {name} | {_num(ms, 2)} | {_num(ms / total * 100, 1)}% |")
    lines.append(f"| total | {_num(total, 2)} | 100% |")
    lines += [""] + [f"- {note}" for note in r.notes] + ([""] if r.notes else [])
    return "\n".join(lines)


def format_summary(results: Sequence[BenchResult]) -> str:
    lines = ["### Summary", "", "| run | steps/s | images/s | overhead | MFU | peak memory |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if r.error is not None:
            lines.append(f"| {r.spec.title} | not measured: {r.error[:80]} | | | | |")
            continue
        mfu = r.mfu(r.step_s)
        memory = _gib(r.peak_allocated) if r.peak_allocated is not None else f"RSS {_gib(r.peak_rss)}"
        lines.append(f"| {r.spec.title} | {_num(r.steps_per_s, 3)} | {_num(r.images_per_s, 3)} | "
                     f"{_num(r.overhead, 3)}x | {'n/a' if mfu is None else f'{mfu * 100:.1f}%'} | {memory} |")
    return "\n".join(lines + [""])


def environment_line() -> str:
    import diffusers

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}", f"diffusers {diffusers.__version__}",
             f"{torch.get_num_threads()} CPU threads", platform.platform()]
    return "Environment: " + ", ".join(parts)


# ---------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train_tools.bench.speed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, help="cpu-tiny (default without a GPU), gpu-sd15 (default with "
                   "one: SD1.5 at 512, batch 1 and 4, checkpointing off and on, and batch 1 with checkpointing and "
                   "AdamW8bit) or gpu-sdxl (SDXL at 1024)")
    p.add_argument("--family", choices=FAMILIES)
    p.add_argument("--model-size", dest="size", choices=("tiny", "full"),
                   help="tiny demo model or the full architecture with random weights")
    p.add_argument("--resolution", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--mixed-precision", choices=("fp16", "bf16", "no"))
    p.add_argument("--steps", type=int, help="timed steady-state steps (after the warm-up)")
    p.add_argument("--warmup", type=int, help="steps before the timing starts (default 3)")
    p.add_argument("--phase-steps", type=int, help="extra steps timed phase by phase (default min(10, steps))")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the UNet")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="also train the text encoder (default: frozen, its outputs cached)")
    p.add_argument("--network-dim", type=int)
    p.add_argument("--flat", action=argparse.BooleanOptionalAction, default=None,
                   help="lay the LoRA weights out in one tensor per group where the optimizer allows it (default; "
                        "--no-flat keeps them separate, to measure what the layout gives)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "train_tools_bench",
                   help="where the models are kept between runs (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep each run's data folder")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def specs_from_args(args: argparse.Namespace) -> list[BenchSpec]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("gpu-sd15" if device.startswith("cuda") else "cpu-tiny")
    if preset.startswith("gpu") and not device.startswith("cuda"):
        raise UserError(f"The {preset} preset needs a CUDA GPU; use --preset cpu-tiny on this machine.")
    names = ("family", "size", "resolution", "batch", "gradient_checkpointing", "optimizer", "mixed_precision",
             "steps", "warmup", "phase_steps", "compile", "channels_last", "train_text_encoder", "network_dim", "flat")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    overrides["device"] = device
    specs = apply_overrides(preset_specs(preset, device), overrides)
    fixed = []
    for spec in specs:
        if args.phase_steps is None:
            spec = dataclasses.replace(spec, phase_steps=max(1, min(10, spec.steps)))
        if spec.steps < 1 or spec.warmup < 1 or spec.batch < 1:
            raise UserError("--steps, --warmup and --batch must be at least 1.")
        if spec.mixed_precision != "no" and not device.startswith("cuda"):
            raise UserError("Mixed precision needs a CUDA GPU; the CPU benchmark runs in fp32 (--mixed-precision no).")
        fixed.append(spec)
    return fixed


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.verbose:
        logging.getLogger("train_tools").setLevel(logging.INFO)
    out = sys.stdout
    try:
        specs = specs_from_args(args)
        args.work_dir.mkdir(parents=True, exist_ok=True)
        out.write(f"## Train Tools benchmark, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n\n{environment_line()}\n\n")
        out.flush()
        results = []
        for index, spec in enumerate(specs, start=1):
            log.info("Run %d of %d: %s", index, len(specs), spec.title)
            result = run_one(spec, args.work_dir, keep=args.keep)
            results.append(result)
            out.write(format_result(result) + "\n")
            out.flush()
        if len(results) > 1:
            out.write(format_summary(results) + "\n")
    except UserError as exc:
        log.error("Error: %s", exc)
        return 2
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
