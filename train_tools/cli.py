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
    python -m train_tools demo-model pretrain [--out PATH] [--seed N] [--vae-steps N] [--unet-steps N]

Errors a user can fix print one line and exit with status 2; Ctrl-C stops training cleanly after saving.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .commands import cmd_dataset, cmd_demo_pretrain, cmd_install, cmd_preset, cmd_preview, cmd_runs, cmd_train
from .config import fields_info
from .config_values import parse_assignments
from .errors import UserError, from_os_error
from .models.resolve import default_ckpt_dirs
from .store import Store

log = logging.getLogger("train_tools")


def _settings_help() -> str:
    lines = ["settings (--set key=value; defaults of the original Train Tools tab):"]
    for f in fields_info():
        meta = f.metadata
        choices = f" [{'|'.join(meta['choices'])}]" if meta["choices"] else ""
        lines.append(f"  {f.name}={f.default!s}{choices}  {meta['help']}")
    lines.append("  learning_rate may be a comma list (1e-4,5e-5): one run per value.")
    return "\n".join(lines)


class CommandParser(argparse.ArgumentParser):
    """The command line's parser, which also knows its command names: ``run`` tells app flags from commands."""

    command_names: tuple[str, ...] = ()


def build_parser() -> CommandParser:
    parser = CommandParser(prog="python -m train_tools", description="Train Tools: turn 10-20 pictures into a LoRA.")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("."),
        help="folder holding outputs/train_tools/projects (default: the current folder)",
    )
    parser.add_argument(
        "--ckpt-dir",
        type=Path,
        action="append",
        default=None,
        help="checkpoint folder to find base models by name (default: DATA_DIR/models/Stable-diffusion)",
    )
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
    ar = dsub.add_parser(
        "add-reg",
        help="copy regularisation (class) images, and their .txt captions, into the "
        "version: trained beside the dataset without the trigger word (see reg_caption, "
        "prior_loss_weight)",
    )
    ar.add_argument("project")
    ar.add_argument("version")
    ar.add_argument("paths", nargs="+", type=Path, help="image files or folders")
    u = dsub.add_parser("update", help="prepare the images for training (resize to buckets, captions)")
    u.add_argument("project")
    u.add_argument("version")
    d = dsub.add_parser("demo", help="add the built-in demo pictures to a version")
    d.add_argument("project")
    d.add_argument("version")

    t = sub.add_parser(
        "train",
        help="train a LoRA on the version's dataset",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_settings_help(),
    )
    t.add_argument("project")
    t.add_argument("version")
    t.add_argument("--ckpt", help="base checkpoint (.safetensors/.ckpt), a path or a name in the checkpoint folder")
    t.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a setting for this and later runs of the version",
    )
    t.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    t.add_argument(
        "--lora-dir",
        type=Path,
        help="where the setting network_weights (a LoRA to train on from) is looked for (default: "
        "models/Lora in the data folder)",
    )
    t.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="RUN",
        help="go on with a stopped run (Interrupt, Ctrl-C, a crash, a reboot) in its own folder: the "
        "newest run, or RUN (its folder name in trains/); it keeps the settings it began with",
    )

    s = sub.add_parser(
        "settings",
        help="show or change a version's saved settings",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_settings_help(),
    )
    s.add_argument("project")
    s.add_argument("version")
    s.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE")

    pr = sub.add_parser("preset", help="list presets, save a version's settings as one, or apply one to a version")
    pr.add_argument("action", choices=["list", "save", "apply"])
    pr.add_argument("name", nargs="?", help="the preset's name (save, apply)")
    pr.add_argument("project", nargs="?")
    pr.add_argument("version", nargs="?")
    pr.add_argument("--description", default="", help="what the preset is for (save)")

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
    ins.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a LoRA of the same name (default: keep both, the new one with a suffix)",
    )

    dc = sub.add_parser("demo-checkpoint", help="write the tiny demo model (random weights) to PATH")
    dc.add_argument("path", type=Path)
    dc.add_argument("--family", default="sd1", choices=("sd1", "sdxl"))

    dm = sub.add_parser("demo-model", help="the demo model that has learned the shapes world")
    dmsub = dm.add_subparsers(dest="action", metavar="ACTION", required=True)
    pre = dmsub.add_parser(
        "pretrain",
        help="pretrain the tiny SD1 model (VAE, text encoder, UNet) on the shapes "
        "world; the same seed gives the same weights on one machine",
    )
    pre.add_argument("--out", type=Path, default=Path("shapes-demo.safetensors"), help="checkpoint to write")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--pictures", type=int, help="pictures of the world rendered for training")
    pre.add_argument("--vae-steps", type=int, help="VAE training steps")
    pre.add_argument("--unet-steps", type=int, help="UNet + text encoder training steps")
    pre.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")

    from .ui.app import add_app_arguments

    ap = sub.add_parser("app", help="open the Train Tools tab in a browser (the default with no command)")
    add_app_arguments(ap, with_paths=False)
    parser.command_names = tuple(sub.choices)
    return parser


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
        return cmd_dataset(args, store)
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
    if args.command == "preset":
        return cmd_preset(args, store)
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
    if args.command == "demo-model":
        return cmd_demo_pretrain(args)
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
