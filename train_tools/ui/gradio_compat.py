"""What differs between the Gradio versions the tab runs under: 3.41 (A1111 1.10), 4.x (Forge), 5-6 (the
standalone app). Each helper does one thing the same way everywhere, or as close as that Gradio allows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr


def on_page_load(root: gr.Blocks, fn: Callable[..., list[Any]], outputs: list[Any]) -> None:
    """Run ``fn`` on every page load. ``Blocks.load`` exists in every Gradio; nested tabs' loads fire too."""
    root.load(fn, inputs=None, outputs=outputs)


def gradio_major() -> int:
    try:
        return int(str(gr.__version__).split(".")[0])
    except ValueError:
        return 0


def with_progress(fn: Callable[..., list[Any]]) -> Callable[..., list[Any]]:
    """``fn(*inputs, progress=report)`` as an event function: Gradio draws a progress bar over the event's
    outputs while ``report(what, done, total, unit)`` (a ``TaskFn``) is called. Gradio 3 refuses to launch a
    page with such a bar when its queue is off (A1111's --no-gradio-queue), so there ``fn`` gets no
    ``progress`` and no bar."""
    if gradio_major() < 4:
        return fn

    def event(progress: Any = gr.Progress(), *inputs: Any) -> list[Any]:  # noqa: B008 - how Gradio finds its bar
        # Gradio passes its bar for a parameter whose default is a gr.Progress, at that parameter's place.
        def report(what: str, done: int, total: int, unit: str = "") -> None:
            progress((done, total), desc=what, unit="bytes" if unit == "B" else "steps")

        return fn(*inputs, progress=report)

    event.__name__ = getattr(fn, "__name__", "event")
    return event


def poll_every(
    root: gr.Blocks, seconds: float, fn: Callable[..., list[Any]], inputs: list[Any], outputs: list[Any]
) -> Any:
    """Call ``fn`` every ``seconds`` while the page is open: ``gr.Timer`` in Gradio 4.40+, ``every=`` before."""
    if hasattr(gr, "Timer"):
        timer = gr.Timer(seconds)
        timer.tick(fn, inputs=inputs, outputs=outputs, show_progress="hidden")
        return timer
    return root.load(fn, inputs=inputs, outputs=outputs, every=seconds, show_progress="hidden")
