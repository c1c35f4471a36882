"""Stand-in GPU queue: one lock, task ids, and A1111's habit of appending timing HTML to the last output."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from modules import shared

queue_lock = threading.Lock()
tasks: list[str] = []


def wrap_gradio_call(
    func: Callable[..., Any], extra_outputs: list[Any] | None = None, add_stats: bool = False
) -> Callable[..., Any]:
    def f(*args: Any, **kwargs: Any) -> Any:
        try:
            res = list(func(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - the WebUI shows errors as HTML, as here
            res = list(extra_outputs or []) + [f"<div class='error'>{type(exc).__name__}: {exc}</div>"]
        finally:
            shared.state.interrupted = False
            shared.state.job_count = 0
        if add_stats:
            res[-1] += "<div class='performance'>Time taken: 0.1 sec.</div>"  # fails unless the last is a str
        return tuple(res)

    return f


def wrap_gradio_gpu_call(func: Callable[..., Any], extra_outputs: list[Any] | None = None) -> Callable[..., Any]:
    def f(*args: Any, **kwargs: Any) -> Any:
        id_task = args[0] if args and isinstance(args[0], str) and args[0].startswith("task(") else None
        with queue_lock:
            tasks.append(id_task or "")
            shared.state.begin(job=id_task or "")
            try:
                res = func(*args, **kwargs)
            finally:
                shared.state.end()
        return res

    return wrap_gradio_call(f, extra_outputs=extra_outputs, add_stats=True)
