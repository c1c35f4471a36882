"""Stand-in devices: the WebUI's chosen torch device and its cache cleaner."""

from __future__ import annotations

device = "cpu"
gc_calls = 0


def torch_gc() -> None:
    global gc_calls
    gc_calls += 1
