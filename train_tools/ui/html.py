"""The tab's HTML: messages, the results table, the tag list, the progress bar with its loss chart.

Plain strings built from plain values (no Gradio), so every Gradio version shows the same thing and the
tests read it directly; ``style.css`` styles the classes, and inline attributes keep it readable without it.
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Sequence
from pathlib import Path

from ..progress import task_amount
from .jobs import FAILED, FINISHED, INTERRUPTED, RUNNING, JobStatus

MAX_CHART_POINTS = 300
FAMILY_NAMES = {
    "sd1": "SD 1.x",
    "sd2": "SD 2.x (512)",
    "sd2v": "SD 2.x 768 (v-prediction)",
    "sdxl": "SDXL",
    "sdxlv": "SDXL (v-prediction)",
}


@dataclasses.dataclass
class ResultFile:
    """One LoRA file of a run, as the results table lists it."""

    run: str
    path: Path
    size: int
    epoch: str
    steps: str

    @property
    def choice(self) -> str:
        return f"{self.run}/{self.path.name}"


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def message_html(text: str, kind: str = "info") -> str:
    if not text:
        return ""
    return f'<div class="tt-msg tt-{kind}">{html.escape(text)}</div>'


def results_html(files: list[ResultFile]) -> str:
    if not files:
        return '<div class="tt-results tt-empty">No trained files yet.</div>'
    rows = []
    for f in files:
        stem = html.escape(f.path.stem)
        rows.append(
            f"<tr><td>{html.escape(f.run)}</td><td class='tt-file'>{html.escape(f.path.name)}</td>"
            f"<td>{human_size(f.size)}</td><td>{html.escape(f.epoch)}</td><td>{html.escape(f.steps)}</td>"
            f"<td><button class='tt-copy-prompt' title='copy the prompt tag' "
            f'onclick="window.trainToolsCopyText &amp;&amp; trainToolsCopyText(this)" '
            f"data-text='&lt;lora:{stem}:0.8&gt;'>&lt;lora:{stem}:0.8&gt;</button></td></tr>"
        )
    return (
        "<table class='tt-results'><thead><tr><th>run</th><th>file</th><th>size</th><th>epoch</th>"
        "<th>steps</th><th>prompt</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def family_line(family: str) -> str:
    return f"Detected: **{FAMILY_NAMES[family]}**" if family in FAMILY_NAMES else ""


def demo_line(estimate: str) -> str:
    """The family line for the demo model: what it is, and how long a run of the settings shown takes here."""
    return f"Demo model (tiny {FAMILY_NAMES['sd1']}): a run of these settings takes **{estimate}**"


# The tag list's look is inline as well as in style.css: in A1111 1.10 and the standalone app the chips read
# "simple shapes 12my cat 12" wherever the stylesheet does not reach them.
_TAG_LIST_STYLE = "list-style:none;margin:0.3em 0;padding:0;display:flex;flex-wrap:wrap;gap:6px"
_TAG_STYLE = (
    "display:inline-flex;align-items:center;gap:6px;margin:0;padding:1px 3px 1px 10px;"
    "border:1px solid rgba(128,128,128,.45);border-radius:999px;line-height:1.6"
)
_COUNT_STYLE = (
    "min-width:1.6em;padding:0 6px;border-radius:999px;background:rgba(128,128,128,.22);"
    "text-align:center;font-weight:600;font-variant-numeric:tabular-nums"
)


def tags_html(counts: list[tuple[str, int]], limit: int = 80) -> str:
    """The dataset's tags with their counts, most frequent first (what ``ss_tag_frequency`` will record).

    One list item per tag, the tag and its count in separate elements: a chip with the count in a badge, and
    still one tag and its count per line where no style applies at all (a screen reader, a text browser).
    """
    if not counts:
        return '<div class="tt-tags tt-empty">No tags yet: prepare the dataset first.</div>'
    chips = "".join(
        f'<li class="tt-tag" data-tag="{html.escape(tag)}" style="{_TAG_STYLE}" '
        f'title="{html.escape(tag)}: in {n} {"picture" if n == 1 else "pictures"}">'
        f'<span class="tt-tag-name">{html.escape(tag)}</span> <span class="tt-count" style="{_COUNT_STYLE}">{n}</span>'
        f"</li>"
        for tag, n in counts[:limit]
    )
    more = (
        f'<li class="tt-more" style="margin:0;padding:1px 6px;opacity:.75">and {len(counts) - limit} more</li>'
        if len(counts) > limit
        else ""
    )
    head = (
        f'<div class="tt-tags-head" style="font-size:.9em;opacity:.8">{len(counts)} '
        f"{'tag' if len(counts) == 1 else 'tags'}, each with the number of pictures whose caption has it:</div>"
    )
    return f'<div class="tt-tags">{head}<ul class="tt-tag-list" style="{_TAG_LIST_STYLE}">{chips}{more}</ul></div>'


def fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def loss_chart_svg(
    losses: Sequence[float],
    width: int = 600,
    height: int = 120,
    validation: Sequence[tuple[int, float]] = (),
) -> str:
    """An inline SVG of the loss per step with a smoothed line, and the validation loss at the steps it was
    computed in orange (``validation``: (index in ``losses``, loss)): no plotting library, same in every Gradio."""
    if len(losses) < 2:
        return ""
    bucket = max(1, math.ceil(len(losses) / MAX_CHART_POINTS))
    points = [sum(losses[i : i + bucket]) / len(losses[i : i + bucket]) for i in range(0, len(losses), bucket)]
    smooth, ema = [], points[0]
    for value in points:
        ema = 0.9 * ema + 0.1 * value
        smooth.append(ema)
    lo, hi = min(points + [v for _, v in validation]), max(points + [v for _, v in validation])
    span = (hi - lo) or 1.0
    held = " ".join(
        f"{i / max(1, len(losses) - 1) * width:.1f},{height - 4 - (v - lo) / span * (height - 8):.1f}"
        for i, v in validation
    )
    held_line = (
        f'<polyline class="tt-validation" fill="none" stroke="#e67e22" stroke-width="2" '
        f'vector-effect="non-scaling-stroke" points="{held}"/>'
        if validation
        else ""
    )
    held_legend = f"; validation loss (orange) {validation[-1][1]:.4f} at last" if validation else ""

    def path(values: list[float]) -> str:
        step = width / max(1, len(values) - 1)
        return " ".join(
            f"{i * step:.1f},{height - 4 - (v - lo) / span * (height - 8):.1f}" for i, v in enumerate(values)
        )

    # Presentation attributes as well as classes: the chart must read right even where style.css is missing.
    return (
        f'<svg class="tt-chart" viewBox="0 0 {width} {height}" width="100%" height="{height}" '
        f'preserveAspectRatio="none" role="img" aria-label="loss per step">'
        f'<polyline class="tt-raw" fill="none" stroke="#2f80ed" stroke-opacity="0.35" '
        f'vector-effect="non-scaling-stroke" points="{path(points)}"/>'
        f'<polyline class="tt-smooth" fill="none" stroke="#2f80ed" stroke-width="2" '
        f'vector-effect="non-scaling-stroke" points="{path(smooth)}"/>{held_line}</svg>'
        f'<div class="tt-chart-legend">loss {hi:.4f} (top) to {lo:.4f} (bottom) over {len(losses)} steps'
        f"{held_legend}</div>"
    )


def progress_html(status: JobStatus) -> str:
    """The progress bar, the numbers under it and the loss chart; data-* attributes let tests and JS read it."""
    if status.state == "idle":
        return '<div class="tt-progress" data-state="idle"><div class="tt-info">Not training.</div></div>'
    percent = 100.0 * status.fraction
    parts = []
    if status.task and not status.step and status.state == RUNNING:  # preparing, before the first step
        parts.append(f"{status.task} {task_amount(status.task_done, status.task_total, status.task_unit)}")
    if status.total_steps:
        parts.append(f"step {status.step}/{status.total_steps}")
    if status.total_epochs:
        parts.append(f"epoch {max(status.epoch, 0)}/{status.total_epochs}")
    training = not status.label.startswith("previews")  # a previews job counts pictures and has no loss
    if status.loss is not None and training:
        parts.append(f"loss {status.loss:.4f}")
    if status.steps_per_s:
        parts.append(f"{status.steps_per_s:.2f} it/s")
    if status.state == RUNNING and status.step:
        parts.append(f"ETA {fmt_time(status.eta_s)}")
    parts.append(f"elapsed {fmt_time(status.elapsed_s)}")
    chart = loss_chart_svg(status.losses, validation=status.validation)
    kind = {FAILED: "error", INTERRUPTED: "warn", FINISHED: "ok"}.get(status.state, "info")
    color = {"error": "#d63031", "warn": "#e2a400", "ok": "#27ae60"}.get(kind, "#2f80ed")
    return (
        f'<div class="tt-progress" data-state="{status.state}" data-step="{status.step}" '
        f'data-total="{status.total_steps}" data-job="{status.job_id}">'
        f'<div class="tt-label">{html.escape(status.label)}: {status.state}</div>'
        f'<div class="tt-bar" style="height:14px;background:rgba(128,128,128,.25);border-radius:7px;'
        f'overflow:hidden"><div class="tt-fill tt-{kind}" style="height:100%;background:{color};'
        f'width:{percent:.1f}%"></div></div>'
        f'<div class="tt-info">{html.escape(" · ".join(parts))}</div>'
        f"{message_html(status.message, kind)}{chart if training else ''}</div>"
    )
