"""What each command of the command line does (``cli.py`` parses the arguments and dispatches here): train,
resume, list runs, previews, install, and the dataset commands. Errors a user can fix are UserErrors, printed
by ``cli.main`` as one line.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from .config import TrainConfig
from .config_values import parse_assignments
from .errors import UserError
from .models.resolve import resolve_checkpoint
from .store import Store, Version

log = logging.getLogger("train_tools")


def _learning_rates(assignments: dict[str, str]) -> list[str] | None:
    value = assignments.get("learning_rate")
    if value is None or "," not in value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


class _CtrlC:
    """First Ctrl-C: stop after the current step and save; a second one aborts at once."""

    def __init__(self, stop: object) -> None:
        self.stop = stop
        self.previous: Callable[[int, FrameType | None], Any] | int | None = None  # the handler before ours

    def __enter__(self) -> _CtrlC:
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        log.warning("Stopping after this step and saving... (Ctrl-C again to abort)")
        self.stop.request()  # type: ignore[attr-defined]
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self.previous or signal.default_int_handler)


def cmd_train(args: argparse.Namespace, store: Store, ckpt_dirs: list[Path]) -> int:
    from .hosts.base import default_lora_dir
    from .progress import StopFlag, TerminalReporter
    from .training.trainer import Trainer

    version = store.version(args.project, args.version)
    if args.resume is not None:
        return cmd_resume(args, version, ckpt_dirs)
    assignments = parse_assignments(args.assignments)
    rates = _learning_rates(assignments)
    if rates:
        assignments["learning_rate"] = rates[0]
    if args.ckpt:
        assignments["base_model"] = args.ckpt
    saved = version.load_settings()
    config = saved.updated(assignments)
    checkpoint = resolve_checkpoint(config.base_model, ckpt_dirs)
    if config.base_model != saved.base_model:  # a model newly chosen: the demo's settings, or back from them
        config = _settings_for_new_model(version, saved, assignments, checkpoint, args.device)
    version.save_settings(config)
    configs = [config] + [config.updated({"learning_rate": r}) for r in (rates or [])[1:]]
    stop = StopFlag()
    with _CtrlC(stop), _hold_device(version, args.device):
        for cfg in configs:
            result = Trainer(
                version,
                cfg,
                checkpoint,
                reporter=TerminalReporter(),
                stop=stop,
                device=args.device,
                lora_dir=args.lora_dir or default_lora_dir(store.data_dir),
            ).run()
            if _report_result(result, version):
                return 130
    return 0


def _settings_for_new_model(
    version: Version, saved: TrainConfig, assignments: dict[str, Any], checkpoint: Path, device: str | None
) -> TrainConfig:
    """The version's settings for a newly chosen checkpoint, as the tab sets them (``--set`` wins): the demo
    model's quick-run settings, or the defaults back for those when a real model follows the demo."""
    from .demo_settings import model_switch_changes
    from .models.demo_model import is_demo_checkpoint

    demo = is_demo_checkpoint(checkpoint)
    changes = model_switch_changes(saved.to_dict(), demo=demo)
    if not changes:
        return saved.updated(assignments)
    config = saved.updated(changes).updated(assignments)
    if demo:
        from .demo_settings import FITTED_TO_MACHINE
        from .training.estimate import estimate_demo_run, fit_demo_epochs
        from .ui.views import original_images

        pictures, classes = len(original_images(version)), len(original_images(version, version.reg_dir))
        fitted: dict[str, int] = {}
        if any(name in assignments for name in FITTED_TO_MACHINE):  # --set wins over the fitting too
            found = estimate_demo_run(config, pictures, device, classes)
        else:
            fitted, found = fit_demo_epochs(config, pictures, device, classes)
        config = config.updated(fitted)
        fewer = f", {config.epochs} epochs to fit 3 minutes on this machine" if fitted else ""
        log.info("Demo model: settings for a quick run%s, %s.", fewer, found.sentence())
    else:
        log.info("A real model after the demo model: %s back to their defaults.", ", ".join(changes))
    return config


@contextmanager
def _hold_device(version: Version, device: str | None) -> Iterator[Path]:
    """One run per device, machine-wide, and one writer per version, for all the runs of the command:
    refused with a message naming the run that holds either (see devicelock.py)."""
    from .devicelock import hold, hold_version

    label = f"{version.project} / {version.name} (command line)"
    with hold(version.data_dir, device, label) as path, hold_version(version.path, label):
        yield path


def _report_result(result: Any, version: Version) -> bool:
    """Log the run's folder and files; True when it was interrupted."""
    if result.run_dir is None:
        log.warning("Stopped before training began; nothing was saved.")
        return True
    log.info("Run folder: %s", result.run_dir)
    for path in result.files:
        log.info("  %s", path.name)
    if result.interrupted:
        log.warning(
            "Training was interrupted after %d steps; the files above hold what it learned. Go on with: "
            'python -m train_tools train "%s" "%s" --resume %s',
            result.steps,
            version.project,
            version.name,
            result.run_dir.name,
        )
        return True
    return False


def cmd_resume(args: argparse.Namespace, version: Version, ckpt_dirs: list[Path]) -> int:
    """``train P V --resume [RUN]``: continue a stopped run in its own folder, with its own settings."""
    from .progress import StopFlag, TerminalReporter
    from .training.resume import find_run, resume_inputs, run_is_finished
    from .training.trainer import Trainer

    if args.assignments:
        raise UserError(
            "--set cannot change a resumed run: it keeps the settings it began with; start a new run "
            "(without --resume) to change them."
        )
    run_dir = find_run(version, args.resume or None)
    if run_is_finished(run_dir):
        log.info("Run %s is finished; there is nothing to resume.", run_dir.name)
        return 0
    config, base_model_path = resume_inputs(run_dir, version.load_settings())
    if args.ckpt:
        checkpoint = resolve_checkpoint(args.ckpt, ckpt_dirs)
    elif base_model_path and Path(base_model_path).is_file():
        checkpoint = Path(base_model_path)
    else:
        checkpoint = resolve_checkpoint(config.base_model, ckpt_dirs)
    stop = StopFlag()
    with _CtrlC(stop), _hold_device(version, args.device):
        result = Trainer(
            version, config, checkpoint, reporter=TerminalReporter(), stop=stop, device=args.device, resume_from=run_dir
        ).run()
    return 130 if _report_result(result, version) else 0


def cmd_runs(version: Version) -> int:
    runs = version.runs()
    if not runs:
        log.info("No runs yet for %s / %s.", version.project, version.name)
    for run in runs:
        files = sorted(run.glob("*.safetensors"))
        sys.stdout.write(f"{run}\n")
        for f in files:
            sys.stdout.write(f"  {f.name}\t{f.stat().st_size / 1e6:.1f} MB\n")
    return 0


def cmd_preview(args: argparse.Namespace, store: Store, ckpt_dirs: list[Path]) -> int:
    from .previews.diffusers_previewer import DiffusersPreviewer
    from .previews.grid import PictureBarReporter, generate_grid
    from .previews.runs import choose_run, run_checkpoint, run_config
    from .previews.settings import default_settings
    from .progress import StopFlag

    version = store.version(args.project, args.version)
    run_dir = choose_run(version, args.run)
    config = run_config(run_dir)
    changes = {
        key: getattr(args, key)
        for key in ("prompt", "negative_prompt", "seed", "steps", "cfg_scale", "sampler", "width", "height", "weights")
        if getattr(args, key) is not None
    }
    settings = default_settings(config, version.project, **changes)
    if args.ckpt:
        checkpoint = resolve_checkpoint(args.ckpt, ckpt_dirs)
    else:
        checkpoint = run_checkpoint(run_dir) or resolve_checkpoint(config.base_model, ckpt_dirs)
    stop = StopFlag()
    with _CtrlC(stop):
        previewer = DiffusersPreviewer.from_checkpoint(checkpoint, clip_skip=config.clip_skip, device=args.device)
        try:
            grid = generate_grid(
                run_dir, previewer, settings, include_base=not args.no_base, reporter=PictureBarReporter(), stop=stop
            )
        finally:
            previewer.close()
    sys.stdout.write(f"{grid}\n")
    return 130 if stop.requested else 0


def _version_lora_file(version: Version, choice: str) -> Path:
    """A LoRA file by path, by ``RUN/name`` or by bare name (the newest run that has it)."""
    direct = Path(choice).expanduser()
    if direct.is_file():
        return direct.resolve()
    trains = version.trains_dir.resolve()
    candidate = (trains / choice).resolve()
    if trains in candidate.parents and candidate.is_file():
        return candidate
    for run_dir in reversed(version.runs()):
        path = run_dir / choice
        if path.is_file():
            return path.resolve()
    raise UserError(
        f"'{choice}' is not a file nor a LoRA of the runs of {version.project} / {version.name}; "
        "list them with 'python -m train_tools runs'."
    )


def cmd_install(args: argparse.Namespace, store: Store) -> int:
    from .networks.install import install_lora
    from .previews.grid_info import find_cell
    from .previews.runs import run_config
    from .previews.settings import trigger_word

    version = store.version(args.project, args.version)
    file = _version_lora_file(version, args.file)
    in_run = version.trains_dir.resolve() in file.parents
    config = run_config(file.parent) if in_run else version.load_settings()
    weight, picture = args.weight, args.preview
    if picture is None and in_run:
        cell = find_cell(file.parent, file, weight)
        if cell is not None:
            picture = cell.image
            weight = cell.weight if weight is None else weight
    if picture is None:
        log.info(
            "No preview picture for %s (make one with 'python -m train_tools preview'); installing without.", file.name
        )
    activation = args.activation_text if args.activation_text is not None else trigger_word(config, version.project)
    target = install_lora(
        file,
        args.lora_dir,
        weight=1.0 if weight is None else weight,
        activation_text=activation,
        preview=picture,
        overwrite=args.overwrite,
        name=args.name,
    )
    sys.stdout.write(f"{target}\n")
    return 0


def cmd_dataset(args: argparse.Namespace, store: Store) -> int:
    """``dataset add | add-reg | demo | update``: pictures into the version, and preparing them."""
    from .data.items import auto_repeats
    from .data.uploads import add_originals

    out = sys.stdout
    version = store.version(args.project, args.version)
    if args.action == "add":
        report = add_originals(list(args.paths), version.originals_dir)
        out.write(f"{report.summary()}\n")
        return 0 if report.added else 2
    if args.action == "add-reg":
        report = add_originals(list(args.paths), version.reg_dir)
        out.write(f"Class pictures: {report.summary()}\n")
        return 0 if report.added else 2
    if args.action == "demo":
        from .data.demo_dataset import make_demo_class_pictures, make_demo_dataset
        from .demo_settings import DEMO_CLASS_PICTURES, DEMO_PICTURES

        paths = make_demo_dataset(version.originals_dir, n=DEMO_PICTURES)
        added_classes = make_demo_class_pictures(version.reg_dir, n=DEMO_CLASS_PICTURES)
        out.write(f"added {len(paths)} demo pictures to {version.originals_dir}\n")
        out.write(f"added {len(added_classes)} class pictures of the demo model's world to {version.reg_dir}\n")
        return 0
    config = version.load_settings()
    from .data.preparation import load_reg_items, prepare_items
    from .devicelock import hold_version
    from .progress import TerminalReporter

    # Never under a run of this version: it reads prepared/ while this rewrites it.
    with hold_version(version.path, f"{version.project} / {version.name} (dataset update, command line)"):
        items = prepare_items(version, config, TerminalReporter())  # the class pictures too
    repeats = config.repeats or auto_repeats(len(items))
    n_reg = len(load_reg_items(version))
    seen = len(items) * repeats * (2 if n_reg else 1)  # as many class pictures per epoch as training ones
    steps = -(-seen // config.batch_size)
    classes = f" and {n_reg} class images" if n_reg else ""
    out.write(f"{len(items)} images{classes}, {repeats} repeats, about {steps} steps per epoch\n")
    return 0


def cmd_demo_pretrain(args: argparse.Namespace) -> int:
    """``demo-model pretrain``: the shapes demo model, written to ``--out``; 130 when stopped by Ctrl-C."""
    import dataclasses

    import torch

    from .progress import StopFlag, TerminalReporter
    from .training.demo_pretrain import PretrainSettings, pretrain

    changes = {key: getattr(args, key) for key in ("pictures", "vae_steps", "unet_steps") if getattr(args, key)}
    settings = dataclasses.replace(PretrainSettings(seed=args.seed), **changes)
    if args.threads:
        torch.set_num_threads(args.threads)
    stop = StopFlag()
    with _CtrlC(stop):
        path = pretrain(args.out, settings, reporter=TerminalReporter(), stop=stop)
    if path is None:
        log.warning("Stopped; no checkpoint was written.")
        return 130
    sys.stdout.write(f"wrote {path}\n")
    return 0


def cmd_preset(args: argparse.Namespace, store: Store) -> int:
    """``preset list`` (name and description), ``preset save NAME PROJECT VERSION`` (the version's settings),
    ``preset apply NAME PROJECT VERSION`` (saved as the version's settings)."""
    from .presets import apply_preset, load_preset, preset_names, save_preset

    out = sys.stdout
    if args.action == "list":
        for name in preset_names(store.data_dir):
            out.write(f"{name}: {load_preset(store.data_dir, name).description}\n")
        return 0
    if not (args.name and args.project and args.version):
        raise UserError(f"'preset {args.action}' takes a preset name, a project and a version.")
    version = store.version(args.project, args.version)
    if args.action == "save":
        path = save_preset(store.data_dir, args.name, version.load_settings(), args.description)
        out.write(f"saved preset {path.stem}: {path}\n")
        return 0
    preset = load_preset(store.data_dir, args.name)
    version.save_settings(apply_preset(version.load_settings(), preset))
    out.write(f"applied preset {preset.name} to {version.project} / {version.name}\n")
    return 0
