"""The standalone app: ``python -m train_tools`` opens the Train Tools tab in a browser.

    python -m train_tools [--data-dir DIR] [--ckpt-dir DIR] [--lora-dir DIR] [--port 7860] [--listen [ADDRESS]]
                          [--auth USER:PASSWORD ...] [--auth-file FILE]

It serves this computer only (127.0.0.1) unless --listen is given; on a network, --auth or --auth-file puts a
login in front of it (an address that keeps typing wrong logins is made to wait longer and longer). Only
the projects folder's files (pictures, LoRA files, previews) can be downloaded.

With no checkpoint of the user's, the base-model list offers the built-in demo model (built into
``<data dir>/models/Stable-diffusion`` on first use) and the Dataset section offers demo pictures, so a
newcomer can try the whole flow on a CPU.
"""

from __future__ import annotations

import argparse
import inspect
import ipaddress
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..hosts.base import StandaloneHost
from ..store import projects_root
from .login import LoginThrottle, LoginThrottleMiddleware, login_checker, parse_auth

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]  # the extension folder: style.css, javascript/
DEFAULT_PORT = 7860
DEFAULT_LISTEN = "127.0.0.1"
NETWORK_LISTEN = "0.0.0.0"

OPEN_NETWORK_WARNING = (
    "WARNING: Train Tools listens on %s without --auth: anyone on your network can open it, "
    "train on this computer and write files into its folders. Add --auth USER:PASSWORD "
    "(or --auth-file FILE) to ask for a login."
)


def add_app_arguments(parser: argparse.ArgumentParser, *, with_paths: bool) -> None:
    """The app's flags. ``with_paths`` adds --data-dir/--ckpt-dir/-v (the CLI's main parser already has them)."""
    if with_paths:
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
            help="checkpoint folder (default: DATA_DIR/models/Stable-diffusion); repeatable",
        )
        parser.add_argument("-v", "--verbose", action="store_true", help="show debug messages")
    parser.add_argument(
        "--lora-dir",
        type=Path,
        default=None,
        help="where 'Copy to Lora folder' puts files (default: DATA_DIR/models/Lora)",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to serve on (default {DEFAULT_PORT})")
    parser.add_argument(
        "--listen",
        nargs="?",
        const=NETWORK_LISTEN,
        default=DEFAULT_LISTEN,
        metavar="ADDRESS",
        help=f"serve your network too: --listen alone listens on {NETWORK_LISTEN}, or give an "
        f"address (default {DEFAULT_LISTEN}: this computer only); protect it with --auth",
    )
    parser.add_argument(
        "--auth",
        action="append",
        default=[],
        metavar="USER:PASSWORD",
        help="ask for this user name and password before showing anything; repeatable",
    )
    parser.add_argument(
        "--auth-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="a file of USER:PASSWORD lines (blank lines and # comments are skipped), like --auth",
    )
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train_tools",
        description="Train Tools app: open the tab in a browser. Run "
        "'python -m train_tools --help' for the command line.",
    )
    add_app_arguments(parser, with_paths=True)
    return parser


def host_from_args(args: argparse.Namespace) -> StandaloneHost:
    return StandaloneHost(
        args.data_dir, args.ckpt_dir, args.lora_dir, offer_demo=True, device=getattr(args, "device", None)
    )


def _assets() -> tuple[str, str]:
    css_path, js_path = ROOT / "style.css", ROOT / "javascript" / "train_tools.js"
    css = css_path.read_text(encoding="utf-8") if css_path.is_file() else ""
    js = js_path.read_text(encoding="utf-8") if js_path.is_file() else ""
    return css, js


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def create_app(host: StandaloneHost) -> tuple[Any, dict[str, Any]]:
    """The app's Blocks and the extra keyword arguments its ``launch()`` needs.

    The tab's CSS and JS are the WebUI extension's own files; Gradio 4/5 take them in ``Blocks()``, Gradio 6
    in ``launch()``.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from .layout import build_contents

    css, js = _assets()
    head = f"<script>{js}</script>" if js else ""
    blocks_kw: dict[str, Any] = {"title": "Train Tools", "analytics_enabled": False}
    launch_kw: dict[str, Any] = {}
    target = blocks_kw if _accepts(gr.Blocks.__init__, "css") else launch_kw
    target["css"] = css
    if _accepts(gr.Blocks.__init__, "head") or _accepts(gr.Blocks.launch, "head"):
        (blocks_kw if _accepts(gr.Blocks.__init__, "head") else launch_kw)["head"] = head
    with gr.Blocks(**blocks_kw) as demo, gr.Column(elem_id="tab_train_tools"):
        gr.Markdown("## Train Tools\nDrop 10-20 pictures, press Update Dataset, then Begin Train.")
        handles = build_contents(host, demo)
    demo.train_tools = handles
    return demo, launch_kw


def is_loopback(listen: str) -> bool:
    """Whether ``listen`` serves this computer only (127.x.x.x, ::1, localhost)."""
    if listen.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(listen.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may well be reachable from the network


def served_paths(host: StandaloneHost) -> tuple[list[str], list[str]]:
    """(allowed, blocked) for Gradio's file route: the page only ever shows files of the projects (pictures,
    LoRA files, previews), so only the projects folder is served. The checkpoint and Lora folders are also
    blocked outright, for Gradio versions that serve the working folder by default (3.x)."""
    root = projects_root(host.data_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    blocked = [d for d in (*host.ckpt_dirs, host.lora_dir) if d != root and d not in root.parents]
    return [str(root)], [str(d) for d in blocked]


def serve(
    host: StandaloneHost,
    *,
    port: int = DEFAULT_PORT,
    listen: str = DEFAULT_LISTEN,
    open_browser: bool = True,
    block: bool = True,
    auth: Sequence[tuple[str, str]] | None = None,
    throttle: LoginThrottle | None = None,
) -> Any:
    """Start the web server; with ``block`` it runs until Ctrl-C.

    It serves this computer only unless ``listen`` says otherwise; ``auth`` (user, password) pairs put a
    login in front of every page, API call and file, and ``throttle`` (by default a ``LoginThrottle()``) makes
    an address that keeps guessing wait longer and longer.
    """
    demo, launch_kw = create_app(host)
    if host.offer_demo:
        # The tab shows how long a demo run takes here: measured once now (a few seconds, most of it loading
        # the model code the app needs anyway), so that no page event waits for it.
        from ..config import TrainConfig
        from ..demo_settings import DEMO_SETTINGS
        from ..training.estimate import estimate_demo_run

        log.info("Measuring how long a run of the demo model takes on this machine...")
        found = estimate_demo_run(TrainConfig().updated(DEMO_SETTINGS), 0, host.device())
        log.info("A run of the demo model takes %s.", found.sentence())
    demo.queue()
    host.data_dir.mkdir(parents=True, exist_ok=True)
    allowed, blocked = served_paths(host)
    log.info(
        "Train Tools: data in %s, checkpoints from %s, LoRA files go to %s",
        host.data_dir,
        ", ".join(str(d) for d in host.ckpt_dirs),
        host.lora_dir,
    )
    if not is_loopback(listen) and not auth:
        log.warning(OPEN_NETWORK_WARNING, listen)
    if auth:
        launch_kw["auth"] = login_checker(auth)
        if _accepts(demo.launch, "app_kwargs"):
            from starlette.middleware import Middleware

            launch_kw["app_kwargs"] = {
                "middleware": [Middleware(LoginThrottleMiddleware, throttle=throttle or LoginThrottle())]
            }
        else:
            log.warning("This Gradio cannot slow down repeated wrong logins; choose long passwords.")
    if _accepts(demo.launch, "blocked_paths"):
        launch_kw["blocked_paths"] = blocked
    try:
        demo.launch(
            server_name=listen,
            server_port=port,
            inbrowser=open_browser,
            allowed_paths=allowed,
            prevent_thread_lock=not block,
            **launch_kw,
        )
    except OSError as exc:
        raise UserError(f"Cannot serve on {listen}:{port} ({exc}); pass another --port.") from exc
    return demo


def run_app(args: argparse.Namespace) -> int:
    """Serve with parsed arguments (the CLI's ``app`` command and a bare ``python -m train_tools``)."""
    auth = parse_auth(getattr(args, "auth", None) or [], getattr(args, "auth_file", None))
    serve(host_from_args(args), port=args.port, listen=args.listen, open_browser=not args.no_browser, auth=auth or None)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return run_app(args)
    except UserError as exc:
        log.error("Error: %s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
