"""Stable Diffusion WebUI glue: registers the Train Tools tab and its settings. Nothing else happens here.

The WebUI imports every file in ``scripts/`` at start; this one stays thin so the start stays fast. The
package is imported as ``train_tools``, a name the WebUI and its built-in extensions do not use (unlike
``modules``, ``scripts``, ``networks`` or ``lora``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from modules import script_callbacks

EXTENSION_ROOT = Path(__file__).resolve().parent.parent
if str(EXTENSION_ROOT) not in sys.path:
    # The WebUI puts the extension folder on sys.path while importing scripts; some loaders do not.
    sys.path.insert(0, str(EXTENSION_ROOT))

from train_tools.hosts import webui as webui_host  # noqa: E402 - needs the path above

log = logging.getLogger("train_tools")


def on_ui_tabs() -> list[tuple[Any, str, str]]:
    from train_tools.ui.layout import build_tab

    return [(build_tab(webui_host.WebuiHost()), "Train Tools", "train_tools")]


def on_ui_settings() -> None:
    webui_host.add_settings()


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
