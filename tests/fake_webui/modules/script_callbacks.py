"""Stand-in callback registry: the WebUI calls these after importing scripts/."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ui_tabs_callbacks: list[Callable[[], Any]] = []
ui_settings_callbacks: list[Callable[[], Any]] = []
app_started_callbacks: list[Callable[[Any, Any], Any]] = []


def on_ui_tabs(callback: Callable[[], Any]) -> None:
    ui_tabs_callbacks.append(callback)


def on_ui_settings(callback: Callable[[], Any]) -> None:
    ui_settings_callbacks.append(callback)


def on_app_started(callback: Callable[[Any, Any], Any]) -> None:
    app_started_callbacks.append(callback)


def clear() -> None:
    ui_tabs_callbacks.clear()
    ui_settings_callbacks.clear()
    app_started_callbacks.clear()
