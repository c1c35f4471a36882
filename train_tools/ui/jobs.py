"""One training job at a time per process, run in a background thread that the tab polls.

The tab's Begin Train returns at once; the page then polls ``status()`` for step, loss, speed and ETA. A
background thread (rather than a long request) keeps the progress visible after a page reload and lets the
Interrupt button reach the job from any request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError, from_os_error
from ..progress import MultiReporter, RecordingReporter, Reporter, StopFlag

log = logging.getLogger(__name__)

IDLE, WAITING, RUNNING, FINISHED = "idle", "waiting", "running", "finished"
INTERRUPTED, FAILED = "interrupted", "failed"

OOM_ADVICE = (
    "Out of GPU memory: lower the batch size, the resolution or the network dim, turn on gradient "
    "checkpointing or use AdamW8bit, and close other programs that use the GPU."
)

# ``work`` receives the reporter to report to and the stop flag to honour; it returns what it made.
Work = Callable[[Reporter, StopFlag], Any]


@dataclass
class JobStatus:
    """A snapshot of the current (or last) job, safe to read from any thread."""

    state: str = IDLE
    label: str = ""
    job_id: int = 0
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    total_epochs: int = 0
    loss: float | None = None
    steps_per_s: float = 0.0
    eta_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)  # (index in losses, held-out pictures' loss)
    message: str = ""
    files: list[Path] = field(default_factory=list)
    elapsed_s: float = 0.0
    task: str = ""  # work before the first step (preparing pictures, a download), and how far it is
    task_done: int = 0
    task_total: int = 0
    task_unit: str = ""

    @property
    def active(self) -> bool:
        return self.state in (WAITING, RUNNING)

    @property
    def fraction(self) -> float:
        if self.state == FINISHED:
            return 1.0
        if self.total_steps and (self.step or not self.task_total):
            return min(1.0, self.step / self.total_steps)
        return min(1.0, self.task_done / self.task_total) if self.task_total else 0.0


class Job:
    def __init__(self, job_id: int, label: str) -> None:
        self.id = job_id
        self.label = label
        self.reporter = RecordingReporter()
        self.stop = StopFlag()
        self.state = WAITING
        self.message = "Waiting for the GPU..."
        self.result: Any = None
        self.error: BaseException | None = None
        self.started = time.time()
        self.ended: float | None = None
        self.thread: threading.Thread | None = None


class JobManager:
    """Starts, watches and stops the one job of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._job: Job | None = None
        self._next_id = 1

    @property
    def busy(self) -> bool:
        job = self._job
        return job is not None and job.state in (WAITING, RUNNING)

    def start(
        self,
        work: Work,
        *,
        label: str = "training",
        wrap: Callable[[Callable[[], None]], Callable[[], Any]] | None = None,
        before: Callable[[], None] | None = None,
        after: Callable[[], None] | None = None,
        extra_reporter: Callable[[StopFlag], Reporter | None] | None = None,
    ) -> Job:
        """Run ``work`` in a background thread; a UserError if a job is already running.

        ``wrap`` puts the body under the host's GPU queue; ``before``/``after`` free and restore the host's
        GPU around the work (``after`` runs even when the work fails); ``extra_reporter`` mirrors progress
        into the host.
        """
        with self._lock:
            if self.busy:
                current = self._job
                raise UserError(
                    f"A training job is already running ({current.label if current else ''}); wait "
                    "for it to finish or press Interrupt."
                )
            job = Job(self._next_id, label)
            self._next_id += 1
            self._job = job
        extra = extra_reporter(job.stop) if extra_reporter else None
        reporter: Reporter = MultiReporter(job.reporter, extra) if extra else job.reporter

        def body() -> None:
            job.state = RUNNING
            job.message = "Starting..."
            try:
                if before:
                    before()
                try:
                    job.result = work(reporter, job.stop)
                finally:
                    if after:
                        after()
            except UserError as exc:
                job.error = exc
                job.state, job.message = FAILED, str(exc)
            except BaseException as exc:  # noqa: BLE001 - every failure must reach the page, not die in a thread
                job.error = exc
                job.state, job.message = FAILED, describe_failure(exc)
                if from_os_error(exc) is None:  # a read-only folder or a full disk is the user's to fix: no trace
                    log.exception("Training failed")
                else:
                    log.error("Train Tools: %s", job.message)
            else:
                interrupted = bool(getattr(job.result, "interrupted", False)) or (
                    isinstance(job.result, list) and any(getattr(r, "interrupted", False) for r in job.result)
                )
                job.state = INTERRUPTED if interrupted or job.stop.requested else FINISHED
                job.message = finish_message(job)
            finally:
                job.ended = time.time()

        runner: Callable[[], Any] = wrap(body) if wrap else body

        def thread_main() -> None:
            try:
                runner()
            except BaseException as exc:  # noqa: BLE001 - a failing host wrapper must not leave the job "running"
                if job.state in (WAITING, RUNNING):
                    job.error = exc
                    job.state, job.message = FAILED, describe_failure(exc)
                    job.ended = time.time()
                    log.exception("Training could not run")
            if job.state in (WAITING, RUNNING):
                # The host's queue returned without running the body (e.g. the WebUI was interrupted before).
                job.state, job.message = FAILED, "The training job did not run; press Begin Train again."
                job.ended = time.time()

        job.thread = threading.Thread(target=thread_main, name=f"train_tools-job-{job.id}", daemon=True)
        job.thread.start()
        return job

    def stop(self) -> str:
        """Ask the running job to stop after its current step (it then saves what it learned)."""
        job = self._job
        if job is None or job.state not in (WAITING, RUNNING):
            return "Nothing is training."
        job.stop.request()
        if not job.reporter.steps and not job.label.startswith("previews"):
            return "Stopping before training begins (at the next picture being prepared); nothing will be saved."
        return "Stopping after the current step; what was learned so far will be saved."

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Block until the current job ends (tests, and the command line) and return its status."""
        job = self._job
        if job is not None and job.thread is not None:
            job.thread.join(timeout)
        return self.status()

    @property
    def current(self) -> Job | None:
        return self._job

    def status(self) -> JobStatus:
        job = self._job
        if job is None:
            return JobStatus()
        rec = job.reporter
        steps = list(rec.steps)  # copy first: the training thread appends meanwhile
        last = steps[-1] if steps else None
        task = rec.tasks[-1] if rec.tasks else ("", 0, 0, "")
        end = job.ended or time.time()
        return JobStatus(
            state=job.state,
            label=job.label,
            job_id=job.id,
            step=last.step if last else 0,
            total_steps=last.total_steps if last else rec.total_steps,
            epoch=last.epoch if last else 0,
            total_epochs=last.total_epochs if last else rec.total_epochs,
            loss=last.avg_loss if last else None,
            steps_per_s=last.steps_per_s if last else 0.0,
            eta_s=last.eta_s if last and job.state == RUNNING else 0.0,
            losses=[s.loss for s in steps],
            validation=[(at - steps[0].step, loss) for at, loss in list(rec.validations)] if steps else [],
            message=job.message if job.state != RUNNING else _running_message(rec),
            files=list(rec.saved_files),
            elapsed_s=end - job.started,
            task=task[0],
            task_done=task[1],
            task_total=task[2],
            task_unit=task[3],
        )


def _running_message(rec: RecordingReporter) -> str:
    """What the trainer is doing: its last message before the first step, then the last file saved."""
    if rec.saved_files:
        return f"Saved {rec.saved_files[-1].name}"
    if not rec.steps and rec.messages:
        return rec.messages[-1]
    return "Training..." if rec.steps else "Starting..."


def describe_failure(exc: BaseException) -> str:
    """One sentence for the page: what went wrong and, where we know it, what to change."""
    text = str(exc)
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text.lower():
        return OOM_ADVICE
    friendly = from_os_error(exc)
    if friendly is not None:
        return str(friendly)
    return f"Training failed: {type(exc).__name__}: {text} (the console has the details)."


def finish_message(job: Job) -> str:
    files = job.reporter.saved_files
    minutes = ((job.ended or time.time()) - job.started) / 60
    if job.state == INTERRUPTED or job.stop.requested:
        if files:
            return f"Interrupted; {len(files)} file(s) saved, the last is {files[-1].name}."
        return "Interrupted before anything was saved."
    if files:
        return f"Done in {minutes:.1f} min: {len(files)} file(s) saved, the last is {files[-1].name}."
    return f"Done in {minutes:.1f} min."


#: The one job manager of this process (the tab and the WebUI glue share it).
JOBS = JobManager()


def _ensure_free(version: Any, device: str | None) -> None:
    """DeviceBusy now, for the page, when another run holds the device (machine-wide) or the version."""
    from ..devicelock import ensure_file_free, ensure_free, version_lock_path

    ensure_free(version.data_dir, device)
    ensure_file_free(version_lock_path(version.path), f"version {version.project} / {version.name}", version.data_dir)


@contextmanager
def _hold(version: Any, device: str | None) -> Iterator[None]:
    """The device and the version for all the runs of a job, so no run or dataset update slips in between."""
    from ..devicelock import hold, hold_version

    label = f"{version.project} / {version.name} (Train Tools tab)"
    with hold(version.data_dir, device, label), hold_version(version.path, label):
        yield


def training_work(version: Any, configs: list[Any], checkpoint: Path, device: str | None, host: Any = None) -> Work:
    """The work of Begin Train: one Trainer run per config (a learning-rate list gives several).

    Refused at once (a UserError for the page) when another run, of this process or another (a second
    browser tab, the command line, another data dir), holds the device or the version; the work itself holds
    both for all its runs, so no run nor dataset update can slip in between them.
    """
    _ensure_free(version, device)

    def work(reporter: Reporter, stop: StopFlag) -> list[Any]:
        from ..training.trainer import Trainer  # torch and diffusers load here, in the job, not when the tab is built

        results = []
        with _hold(version, device):
            for config in configs:
                result = Trainer(
                    version, config, checkpoint, reporter=reporter, stop=stop, device=device, host=host
                ).run()
                results.append(result)
                if result.interrupted or stop.requested:
                    break
        return results

    return work


def resume_work(
    version: Any,
    run_dir: Path,
    checkpoint: Path | None,
    device: str | None,
    resolve: Callable[[str], Path] | None = None,
    host: Any = None,
) -> Work:
    """The work of a Resume button: go on with ``run_dir`` (see ``resume.py``) in its own folder.

    ``checkpoint`` None means the base model the run began with: its recorded path, else its name through
    ``resolve`` (the host's ``resolve_checkpoint``).
    """
    from ..training.resume import resume_inputs

    _ensure_free(version, device)
    config, base_model_path = resume_inputs(Path(run_dir), version.load_settings())
    if checkpoint is None:
        if base_model_path and Path(base_model_path).is_file():
            checkpoint = Path(base_model_path)
        elif resolve is not None:
            checkpoint = resolve(config.base_model)
        else:
            raise UserError(
                f"The base model of run {Path(run_dir).name} ({base_model_path or config.base_model}) "
                "was not found; put it back in the checkpoint folder to resume."
            )

    def work(reporter: Reporter, stop: StopFlag) -> list[Any]:
        from ..training.trainer import Trainer

        with _hold(version, device):
            return [
                Trainer(
                    version,
                    config,
                    checkpoint,
                    reporter=reporter,
                    stop=stop,
                    device=device,
                    resume_from=Path(run_dir),
                    host=host,
                ).run()
            ]

    return work
