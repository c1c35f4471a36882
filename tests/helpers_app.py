"""Helpers of the tests that drive the tab or serve the app: a free loopback port, and a tab with a version that
has a picture and a checkpoint to choose."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tab_with_picture(data: Path) -> tuple[Any, Any, Path]:
    """(the tab's logic, version p / v1 holding one picture, a checkpoint 'mine.safetensors' in the list)."""
    import train_tools.ui.logic as ui_logic
    from train_tools.hosts.base import StandaloneHost
    from train_tools.ui.jobs import JobManager

    host = StandaloneHost(data)
    logic = ui_logic.TabLogic(host, JobManager())
    logic.create_project("p")
    logic.create_version("p", "v1")
    version = logic.store.version("p", "v1")
    (version.originals_dir / "a.png").write_bytes(b"x")
    ckpt = host.ckpt_dirs[0] / "mine.safetensors"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    return logic, version, ckpt
