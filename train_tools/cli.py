"""The command line: the whole flow of the tab, headless.

    python -m train_tools project create NAME
    python -m train_tools version create NAME v1
    python -m train_tools dataset add NAME v1 IMAGE_OR_FOLDER ...
    python -m train_tools dataset add-reg NAME v1 IMAGE_OR_FOLDER ...   (optional class pictures)
    python -m train_tools train NAME v1 [--ckpt PATH] [--set key=value ...]
    python -m train_tools train NAME v1 --resume [RUN]
    python -m train_tools runs NAME v1
    python -m train_tools preview NAME v1 [--run RUN] [--weights 0.4,0.8,1.0] [--prompt ...]
    python -m train_tools install NAME v1 FILE [--weight W] --lora-dir DIR
    python -m train_tools demo-checkpoint PATH

Errors a user can fix print one line and exit with status 2; Ctrl-C stops training cleanly after saving.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from .config import fields_info, parse_assignments
from .errors import UserError, from_os_error
from .models.resolve import default_ckpt_dirs, resolve_checkpoint
from .store import Store, Version

log = logging.getLogger("train_tools")

def _settings_help() -> str:
    lines = ["settings (--set key=value; defaults of the original Train Tools tab):"]
    for f in fields_info():
        meta = f.metadata
        choices = f" [{'|'.join(meta['choices'])}]" if meta["choices"] else ""
        lines.append(f"  {f.name}={f.default!s}{choices}  {meta['help']}")
    lines.append("  learning_rate may be a comma list (1e-4,5e-5): one run per value.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train_tools",
                                     description="Train Tools: turn 10-20 pictures into a LoRA.")
    parser.add_argument("--data-dir", type=Path, default=Path("."),
                        help="folder holding outputs/train_tools/projects (default: the current folder)")
    parser.add_argument("--ckpt-dir", type=Path, action="append", default=None,
                        help="checkpoint folder to find base models by name (default: DATA_DIR/models/Stable-diffusion)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("project", help="create or list projects")
    psub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    psub.add_parser("create", help="create a project").add_argument("name")
    psub.add_parser("list", help="list projects")

    p = sub.add_parser("version", help="create or list versions of a project")
    vsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = vsub.add_parser("create", help="create a version (default v1)")
    c.add_argument("project")
    c.add_argument("version", nargs="?", default="v1")
    vsub.add_parser("list", help="list the versions of a project").add_argument("project")

    p = sub.add_parser("dataset", help="add pictures to a version and prepare them")
    dsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = dsub.add_parser("add", help="copy images (and their .txt captions) into the version")
    a.add_argument("project")
    a.add_argument("version")
    a.add_argument("paths", nargs="+", type=Path, help="image files or folders")
    ar = dsub.add_parser("add-reg", help="copy regularisation (class) images, and their .txt captions, into the "
                         "version: trained beside the dataset without the trigger word (see reg_caption, "
                         "prior_loss_weight)")
    ar.add_argument("project")
    ar.add_argument("version")
    ar.add_argument("paths", nargs="+", type=Path, help="image files or folders")
    u = dsub.add_parser("update", help="prepare the images for training (resize to buckets, captions)")
    u.add_argument("project")
    u.add_argument("version")
    d = dsub.add_parser("demo", help="add the built-in demo pictures to a version")
    d.add_argument("project")
    d.add_argument("version")

    t = sub.add_parser("train", help="train a LoRA on the version's dataset",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_settings_help())
    t.add_argument("project")
    t.add_argument("version")
    t.add_argument("--ckpt", help="base checkpoint (.safetensors/.ckpt), a path or a name in the checkpoint folder")
    t.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                   help="change a setting for this and later runs of the version")
    t.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    t.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN",
                   help="go on with a stopped run (Interrupt, Ctrl-C, a crash, a reboot) in its own folder: the "
                        "newest run, or RUN (its folder name in trains/); it keeps the settings it began with")

    s = sub.add_parser("settings", help="show or change a version's saved settings",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_settings_help())
    s.add_argument("project")
    s.add_argument("version")
    s.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE")

    r = sub.add_parser("runs", help="list the files each training run wrote")
    r.add_argument("project")
    r.add_argument("version")

    pv = sub.add_parser("preview", help="make the preview grid of a run: epochs x LoRA weights; prints its path")
    pv.add_argument("project")
    pv.add_argument("version")
    pv.add_argument("--run", help="run folder name (default: the newest run)")
    pv.add_argument("--weights", help="comma-separated LoRA weights (default: 0.2,0.4,0.6,0.8,1.0,1.2)")
    pv.add_argument("--prompt", help="prompt (default: the preview prompt setting, else the trigger word)")
    pv.add_argument("--negative", dest="negative_prompt", help="negative prompt")
    pv.add_argument("--seed", type=int, help="seed of every picture (-1: one random seed for the grid)")
    pv.add_argument("--steps", type=int, help="sampling steps (default 20)")
    pv.add_argument("--cfg", dest="cfg_scale", type=float, help="CFG scale (default 7)")
    pv.add_argument("--sampler", help="sampler: Euler a, Euler, DPM++ 2M, DPM++ 2M Karras, DDIM, UniPC, Heun")
    pv.add_argument("--width", type=int, help="picture width (default: the training resolution)")
    pv.add_argument("--height", type=int, help="picture height (default: the training resolution)")
    pv.add_argument("--ckpt", help="base checkpoint (default: the one the run was trained on)")
    pv.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    pv.add_argument("--no-base", action="store_true", help="leave out the 'no LoRA' column")

    ins = sub.add_parser("install", help="copy a LoRA file into a Lora folder with its picture and card metadata")
    ins.add_argument("project")
    ins.add_argument("version")
    ins.add_argument("file", help="a LoRA file of the version's runs (name, RUN/name or a path)")
    ins.add_argument("--lora-dir", type=Path, required=True, help="the WebUI's Lora folder (models/Lora)")
    ins.add_argument("--weight", type=float, help="preferred weight on the Lora card (default: 1.0)")
    ins.add_argument("--name", help="installed name (default: the file's name)")
    ins.add_argument("--preview", type=Path, help="picture for the card (default: from the run's newest grid)")
    ins.add_argument("--activation-text", help="words added with the LoRA (default: the trigger word)")
    ins.add_argument("--overwrite", action="store_true", help="replace a LoRA of the same name (default: keep "
                     "both, the new one with a suffix)")

    dc = sub.add_parser("demo-checkpoint", help="write the tiny demo model (random weights) to PATH")
    dc.add_argument("path", type=Path)
    dc.add_argument("--family", default="sd1", choices=("sd1", "sdxl"))

    from .ui.app import add_app_arguments

    ap = sub.add_parser("app", help="open the Train Tools tab in a browser (the default with no command)")
    add_app_arguments(ap, with_paths=False)
    parser.command_names = tuple(sub.choices)  # type: ignore[attr-defined]  # run() tells app flags from commands
    return parser


def _learning_rates(assignments: dict[str, str]) -> list[str] | None:
    value = assignments.get("learning_rate")
    if value is None or "," not in value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


class _CtrlC:
    """First Ctrl-C: stop after the current step and save; a second one aborts at once."""

    def __init__(self, stop: object) -> None:
        self.stop = stop
        self.previous = None

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
    config = version.load_settings().updated(assignments)
    checkpoint = resolve_checkpoint(config.base_model, ckpt_dirs)
    version.save_settings(config)
    configs = [config] + [config.updated({"learning_rate": r}) for r in (rates or [])[1:]]
    stop = StopFlag()
    with _CtrlC(stop), _hold_device(version, args.device):
        for cfg in configs:
            result = Trainer(version, cfg, checkpoint, reporter=TerminalReporter(), stop=stop,
                             device=args.device).run()
            if _report_result(result, version):
                return 130
    return 0


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
        log.warning("Training was interrupted after %d steps; the files above hold what it learned. Go on with: "
                    "python -m train_tools train \"%s\" \"%s\" --resume %s", result.steps, version.project,
                    version.name, result.run_dir.name)
        return True
    return False


def cmd_resume(args: argparse.Namespace, version: Version, ckpt_dirs: list[Path]) -> int:
    """``train P V --resume [RUN]``: continue a stopped run in its own folder, with its own settings."""
    from .progress import StopFlag, TerminalReporter
    from .training.resume import find_run, resume_inputs, run_is_finished
    from .training.trainer import Trainer

    if args.assignments:
        raise UserError("--set cannot change a resumed run: it keeps the settings it began with; start a new run "
                        "(without --resume) to change them.")
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
        result = Trainer(version, config, checkpoint, reporter=TerminalReporter(), stop=stop, device=args.device,
                         resume_from=run_dir).run()
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
    changes = {key: getattr(args, key) for key in ("prompt", "negative_prompt", "seed", "steps", "cfg_scale",
                                                   "sampler", "width", "height", "weights")
               if getattr(args, key) is not None}
    settings = default_settings(config, version.project, **changes)
    if args.ckpt:
        checkpoint = resolve_checkpoint(args.ckpt, ckpt_dirs)
    else:
        checkpoint = run_checkpoint(run_dir) or resolve_checkpoint(config.base_model, ckpt_dirs)
    stop = StopFlag()
    with _CtrlC(stop):
        previewer = DiffusersPreviewer.from_checkpoint(checkpoint, clip_skip=config.clip_skip, device=args.device)
        try:
            grid = generate_grid(run_dir, previewer, settings, include_base=not args.no_base,
                                 reporter=PictureBarReporter(), stop=stop)
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
    raise UserError(f"'{choice}' is not a file nor a LoRA of the runs of {version.project} / {version.name}; "
                    "list them with 'python -m train_tools runs'.")


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
        log.info("No preview picture for %s (make one with 'python -m train_tools preview'); installing without.",
                 file.name)
    activation = args.activation_text if args.activation_text is not None else trigger_word(config, version.project)
    target = install_lora(file, args.lora_dir, weight=1.0 if weight is None else weight, activation_text=activation,
                          preview=picture, overwrite=args.overwrite, name=args.name)
    sys.stdout.write(f"{target}\n")
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(token in parser.command_names for token in argv) and not {"-h", "--help"} & set(argv):
        # No command: the app, which also takes the app's flags (--port, --listen, --lora-dir).
        from .ui.app import main as app_main

        return app_main(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "app":
        from .ui.app import run_app

        return run_app(args)
    store = Store(args.data_dir)
    ckpt_dirs = args.ckpt_dir or default_ckpt_dirs(store.data_dir)
    out = sys.stdout
    if args.command == "project":
        if args.action == "create":
            name = store.create_project(args.name)
            out.write(f"created project {name}\n")
        else:
            out.writelines(f"{name}\n" for name in store.projects())
        return 0
    if args.command == "version":
        if args.action == "create":
            v = store.create_version(args.project, args.version)
            out.write(f"created version {v.name} of {v.project}: {v.path}\n")
        else:
            out.writelines(f"{name}\n" for name in store.versions(args.project))
        return 0
    if args.command == "dataset":
        from .data.items import auto_repeats
        from .data.uploads import add_originals

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
            from .data.demo_dataset import make_demo_dataset

            paths = make_demo_dataset(version.originals_dir)
            out.write(f"added {len(paths)} demo pictures to {version.originals_dir}\n")
            return 0
        config = version.load_settings()
        from .devicelock import hold_version
        from .data.preparation import load_reg_items, prepare_items
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
    if args.command == "settings":
        version = store.version(args.project, args.version)
        config = version.load_settings()
        if args.assignments:
            config = config.updated(parse_assignments(args.assignments))
            version.save_settings(config)
        out.write(config.to_json() + "\n")
        return 0
    if args.command == "train":
        return cmd_train(args, store, ckpt_dirs)
    if args.command == "runs":
        return cmd_runs(store.version(args.project, args.version))
    if args.command == "preview":
        return cmd_preview(args, store, ckpt_dirs)
    if args.command == "install":
        return cmd_install(args, store)
    if args.command == "demo-checkpoint":
        from .models.demo_model import build_demo_checkpoint

        path = build_demo_checkpoint(args.path, family=args.family)
        out.write(f"wrote {path}\n")
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


def _end_progress_bars() -> None:
    """Close the terminal's progress bars a failing command left drawn, so the error starts on a line of its
    own instead of being glued to the end of a bar."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except UserError as exc:
        _end_progress_bars()
        log.error("Error: %s", exc)
        return 2
    except OSError as exc:
        friendly = from_os_error(exc)
        if friendly is None:
            raise
        _end_progress_bars()
        log.error("Error: %s", friendly)
        return 2
    except KeyboardInterrupt:
        _end_progress_bars()
        log.error("Aborted.")
        return 130
