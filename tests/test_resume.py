"""Reliability (issue 7): resume after any stop ends with the same LoRA as a run never stopped, a kill -9 at
any moment leaves only whole files, a full disk and an out-of-memory stop cleanly with a message, and a run
keeps its own settings and captions while they are edited.

The kill test starts real training processes (the command line's ``train``) and SIGKILLs them at random
moments. To keep it fast the processes are forked from a server that imported torch once (multiprocessing's
"forkserver" with preloaded modules); each one is still its own process, killed for real.
"""

from __future__ import annotations

import errno
import gc
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from tests import fixtures_training
from tests.fixtures_training import StopsAtStep
from train_tools import fileio
from train_tools.config import TrainConfig
from train_tools.errors import UserError
from train_tools.progress import RecordingReporter, StopFlag
from train_tools.store import Store, Version
from train_tools.training.resume import run_is_finished
from train_tools.training.state_files import latest_state, load_state, state_dir, state_files
from train_tools.training.trainer import Trainer

TRIALS = 20


# The shared fixtures, found by pytest under these names.
one_thread = fixtures_training.one_thread
demo_ckpt = fixtures_training.demo_ckpt
pictures = fixtures_training.pictures


def tiny_config(**changes: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        resolution=64,
        min_bucket_reso=64,
        max_bucket_reso=128,
        network_dim=2,
        network_alpha=1.0,
        repeats=1,
        batch_size=1,
        epochs=3,
        save_every_n_epochs=1,
        optimizer="AdamW",
        save_precision="fp32",
        max_token_length=75,
        train_text_encoder=False,
        mixed_precision="no",
        gradient_checkpointing=False,
    )
    base.update(changes)
    return TrainConfig(**base)


def make_version(data_dir: Path, pictures: Path, config: TrainConfig | None = None) -> Version:
    from train_tools.data.uploads import add_originals

    store = Store(data_dir)
    store.create_project("p")
    version = store.create_version("p", "v1")
    add_originals([pictures], version.originals_dir)
    if config is not None:
        version.save_settings(config)
    return version


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as fh:
        return {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - safe_open is not iterable


def assert_same_lora(a: Path, b: Path) -> None:
    ta, tb = lora_tensors(a), lora_tensors(b)
    assert ta.keys() == tb.keys() and ta
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], msg=lambda m, k=key: f"{k}: {m}")


# ---------------------------------------------------------------------- resume equals uninterrupted


def test_interrupted_then_resumed_equals_uninterrupted_despite_edits(tmp_path: Path, demo_ckpt: Path, pictures: Path):
    """Every random source in play (flip, caption shuffle, noise offset, a warm-up + cosine schedule, text
    encoder training): stopped mid-epoch, settings and a caption edited meanwhile, resumed, the same LoRA."""
    config = tiny_config(
        train_text_encoder=True,
        shuffle_caption=True,
        flip_aug=True,
        noise_offset=0.05,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        repeats=2,
    )
    version = make_version(tmp_path, pictures, config)
    straight = Trainer(version, config, demo_ckpt, device="cpu", run_name="straight").run()
    assert straight.steps == 12 and not straight.interrupted

    stop = StopFlag()
    caption = next(version.originals_dir.glob("*.txt"))

    class EditsThenStops(RecordingReporter):
        def step(self, info):  # type: ignore[no-untyped-def]
            super().step(info)
            if info.step == 1:  # the user edits while the run trains: the run must not notice
                version.save_settings(config.updated({"epochs": "7", "learning_rate": "0.01"}))
                caption.write_text("edited, during, training\n", encoding="utf-8")
            if info.step == 7:
                stop.request()

    first = Trainer(
        version, config, demo_ckpt, device="cpu", run_name="stopped", stop=stop, reporter=EditsThenStops()
    ).run()
    assert first.interrupted and first.steps == 7
    run = first.run_dir
    snapshot = json.loads((run / "settings.json").read_text(encoding="utf-8"))
    assert (snapshot["epochs"], snapshot["learning_rate"]) == (3, config.learning_rate)
    assert "edited, during, training" not in (run / "captions.json").read_text(encoding="utf-8")
    # The interrupt state and the state of the last epoch save, nothing else.
    names = [p.name for p in state_files(run)]
    assert names == ["step-00000007-interrupt.state", "step-00000004-save.state"]
    assert (run / "p-v1-000002-interrupted.safetensors").is_file()

    # Resume with today's (edited) settings passed in: the run's own snapshot wins.
    reporter = RecordingReporter()
    resumed = Trainer(
        version, version.load_settings(), demo_ckpt, device="cpu", reporter=reporter, resume_from=run
    ).run()
    assert any("Resuming stopped at step 7 of 12" in m for m in reporter.messages)
    assert [s.step for s in reporter.steps] == [8, 9, 10, 11, 12]
    assert resumed.steps == 12 and not resumed.interrupted and resumed.run_dir == run
    assert resumed.losses[:7] == first.losses and len(resumed.losses) == 12
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    assert_same_lora(straight.final_file, resumed.final_file)  # type: ignore[arg-type]
    assert_same_lora(straight.run_dir / "p-v1-000002.safetensors", run / "p-v1-000002.safetensors")
    assert [p.name for p in state_files(run)] == ["step-00000012-final.state"]
    assert latest_state(run).finished and run_is_finished(run)  # type: ignore[union-attr]

    # Resuming a finished run trains nothing and says so.
    again = RecordingReporter()
    done = Trainer(version, config, demo_ckpt, device="cpu", reporter=again, resume_from=run).run()
    assert done.steps == 12 and not again.steps and "already finished" in again.messages[-1]


def test_resume_refuses_a_changed_picture_set_and_a_other_base_model(tmp_path: Path, demo_ckpt: Path, pictures: Path):
    from train_tools.models.demo_model import build_demo_checkpoint

    config = tiny_config(epochs=2)
    version = make_version(tmp_path, pictures, config)
    stop = StopFlag()

    run = Trainer(version, config, demo_ckpt, device="cpu", stop=stop, reporter=StopsAtStep(stop, 3)).run().run_dir
    other = build_demo_checkpoint(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(UserError, match="not the base model run"):
        Trainer(version, config, other, device="cpu", resume_from=run).run()
    extra = next(p for p in version.originals_dir.iterdir() if p.suffix == ".png")
    shutil.copy(extra, version.originals_dir / "added.png")
    (version.originals_dir / "added.png").write_bytes(extra.read_bytes() + b"\0")  # a different picture
    with pytest.raises(UserError, match="pictures of p / v1 changed"):
        Trainer(version, config, demo_ckpt, device="cpu", resume_from=run).run()


def test_resume_command_line_messages(
    tmp_path: Path, demo_ckpt: Path, pictures: Path, caplog: pytest.LogCaptureFixture
):
    from train_tools.cli import main

    make_version(tmp_path, pictures, tiny_config())
    base = ["--data-dir", str(tmp_path), "train", "p", "v1"]
    with caplog.at_level("INFO"):
        assert main([*base, "--resume"]) == 2
        assert "has no run to resume" in caplog.text
        assert main([*base, "--resume", "../../.."]) == 2
        assert "is not a run of p / v1" in caplog.text
        (Store(tmp_path).version("p", "v1").trains_dir / "r1").mkdir()
        assert main([*base, "--resume", "r1", "--set", "epochs=9"]) == 2
        assert "--set cannot change a resumed run" in caplog.text


def test_the_tab_resumes_through_its_job_manager(tmp_path: Path, demo_ckpt: Path, pictures: Path):
    """What a Resume button runs: ``jobs.resume_work`` finds the base model the run began with by itself."""
    from train_tools.training.resume import find_run
    from train_tools.ui.jobs import FINISHED, INTERRUPTED, JobManager, resume_work, training_work

    config = tiny_config(epochs=2)
    version = make_version(tmp_path, pictures, config)
    jobs = JobManager()

    class StopAtOne(RecordingReporter):
        def step(self, info):  # type: ignore[no-untyped-def]
            jobs.stop()

    jobs.start(training_work(version, [config], demo_ckpt, "cpu"), extra_reporter=lambda stop: StopAtOne())
    assert jobs.wait(120).state == INTERRUPTED
    run = find_run(version)
    assert not run_is_finished(run)
    jobs.start(resume_work(version, run, None, "cpu"))
    status = jobs.wait(120)
    assert status.state == FINISHED, status.message
    assert [f.name for f in status.files] == ["p-v1-000001.safetensors", "p-v1.safetensors"]
    assert status.step == 4 and run_is_finished(run)


# ---------------------------------------------------------------------- kill -9 at random moments


def _cli(argv: list[str], lock_dir: str | None = None) -> None:
    """A training process: exactly what ``python -m train_tools ...`` runs, with its exit status; ``lock_dir``
    gives it device locks of its own (as if it ran on a computer of its own)."""
    from train_tools.cli import main

    if lock_dir is not None:
        os.environ["TRAIN_TOOLS_LOCK_DIR"] = lock_dir
    sys.exit(main(argv))


_PRELOAD = [
    "torch",
    "safetensors.torch",
    "transformers",
    "diffusers",
    "accelerate",
    "peft",
    "PIL.Image",
    "train_tools.training.trainer",
    "train_tools.models.loader",
    "train_tools.cli",
    __name__,
]


@pytest.fixture(scope="module")
def forkserver() -> Any:
    if sys.platform == "win32" or "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork and SIGKILL")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    # One thread per process: a killed run and a resuming one share the two cores without oversubscribing.
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        warm = ctx.Process(target=_cli, args=(["--help"],))
        warm.start()  # starts the server, which imports the preloaded modules once
        warm.join(180)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    yield ctx
    from multiprocessing import forkserver as fs

    stop = getattr(getattr(fs, "_forkserver", None), "_stop", None)
    if stop is not None:
        stop()


def _half_files(folder: Path) -> list[str]:
    """Files under ``folder`` that do not load: LoRA files, training states, settings, prepared pictures."""
    from PIL import Image

    bad = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            if path.suffix == ".safetensors":
                lora_tensors(path)
            elif path.suffix == ".state":
                load_state(path)
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".png" and path.parent.name == "prepared":
                with Image.open(path) as image:
                    image.load()
        except Exception as exc:  # noqa: BLE001 - any failure to load is what this looks for
            bad.append(f"{path.relative_to(folder)}: {exc}")
    return bad


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(f"*{fileio.TEMP_SUFFIX}") if p.name.startswith(".")]


def _kill_during_a_save(proc: Any, trains: Path, deadline: float) -> bool:
    """SIGKILL the moment a temporary file (a save in progress) shows up in a run folder; False on time-out."""
    while time.monotonic() < deadline and proc.is_alive():
        for run in trains.iterdir() if trains.is_dir() else []:
            for folder in (run, run / "state"):
                try:
                    names = os.listdir(folder)
                except OSError:
                    continue
                if any(n.startswith(".") and n.endswith(fileio.TEMP_SUFFIX) for n in names):
                    os.kill(proc.pid, signal.SIGKILL)
                    return True
        time.sleep(0.0005)
    return False


def test_kill_9_at_random_moments_leaves_whole_files_and_resume_finishes_the_same(
    tmp_path: Path, demo_ckpt: Path, pictures: Path, forkserver: Any
):
    template = tmp_path / "template"
    # 2 pictures x 8 repeats x 3 epochs = 48 steps: the 0.2-3 s kills land in loading, steps and saves alike.
    make_version(template, pictures, tiny_config(repeats=8))
    trains = Path("outputs/train_tools/projects/p/versions/v1/trains")
    train_args = ["train", "p", "v1", "--ckpt", str(demo_ckpt), "--device", "cpu"]

    def data_dir(name: str) -> Path:
        return Path(shutil.copytree(template, tmp_path / name, symlinks=True))

    reference_dir = data_dir("reference")
    reference = forkserver.Process(target=_cli, args=(["--data-dir", str(reference_dir), *train_args],))
    began = time.monotonic()
    reference.start()
    reference.join(300)
    assert reference.exitcode == 0
    # Kills fall 0.2-3 s after the start, but not after the time a whole run takes on this machine.
    latest = max(0.4, min(3.0, 0.9 * (time.monotonic() - began)))
    (reference_run,) = (reference_dir / trains).iterdir()
    reference_file = reference_run / "p-v1.safetensors"

    rnd = random.Random(7)
    moments = {"no run yet": 0, "during training": 0, "during a save": 0, "after the end": 0}
    resumed: list[tuple[Path, Any]] = []

    def finish(folder: Path, proc: Any) -> None:
        proc.join(300)
        runs = list((folder / trains).iterdir()) if (folder / trains).is_dir() else []
        if not runs:  # killed before the run folder existed: nothing to resume, and --resume says so
            assert proc.exitcode == 2
            return
        assert proc.exitcode == 0, folder
        (run,) = runs
        assert _half_files(folder) == [] and _temp_files(run) == []
        assert_same_lora(reference_file, run / "p-v1.safetensors")
        assert latest_state(run).finished  # type: ignore[union-attr]

    started = time.monotonic()
    for trial in range(TRIALS):
        folder = data_dir(f"trial-{trial:02d}")
        proc = forkserver.Process(target=_cli, args=(["--data-dir", str(folder), *train_args],))
        proc.start()
        wait = rnd.uniform(0.2, latest)
        if trial % 4 == 3 and _kill_during_a_save(proc, folder / trains, time.monotonic() + 8):
            moments["during a save"] += 1
        else:
            time.sleep(wait)
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
        proc.join(60)
        assert proc.exitcode in (-signal.SIGKILL, 0), proc.exitcode
        runs = list((folder / trains).iterdir()) if (folder / trains).is_dir() else []
        if proc.exitcode == 0:
            moments["after the end"] += 1
        elif not runs:
            moments["no run yet"] += 1
        elif trial % 4 != 3:
            moments["during training"] += 1
        # Whatever the moment: every file written so far loads (temporary leftovers are hidden names).
        assert _half_files(folder) == [], (trial, wait)
        assert sorted(
            p.name for p in (folder / "outputs/train_tools/projects/p/versions/v1/dataset").iterdir()
        ) == sorted(p.name for p in (template / "outputs/train_tools/projects/p/versions/v1/dataset").iterdir())
        # Resume it in the background while the next trial trains: device locks are machine-wide, so the resume
        # gets a lock folder of its own, as if on a second computer.
        if resumed:
            finish(*resumed.pop())
        resume = forkserver.Process(
            target=_cli, args=(["--data-dir", str(folder), *train_args, "--resume"], str(folder / "locks"))
        )
        resume.start()
        resumed.append((folder, resume))
    finish(*resumed.pop())
    # The kills hit the moments that matter (the counts depend on the machine's speed, not the outcome).
    assert moments["during training"] + moments["during a save"] >= TRIALS // 4, moments
    print(f"{TRIALS} kills in {time.monotonic() - started:.0f} s: {moments}")


# ---------------------------------------------------------------------- out of memory, full disk


def test_out_of_memory_stops_frees_memory_and_the_next_run_works(
    tmp_path: Path, demo_ckpt: Path, pictures: Path, monkeypatch: pytest.MonkeyPatch
):
    from train_tools.ui.jobs import FAILED, FINISHED, JobManager, training_work

    version = make_version(tmp_path, pictures)
    config = tiny_config(epochs=1, batch_size=2)
    models: list[weakref.ref] = []
    real_loss = Trainer.loss

    def loss(self: Trainer, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not models:
            models.append(weakref.ref(self.model.unet))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_loss(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "loss", loss)
    jobs = JobManager()
    jobs.start(training_work(version, [config], demo_ckpt, "cpu"))
    status = jobs.wait(120)
    assert status.state == FAILED
    for advice in (
        "Out of memory",
        "batch size (now 2)",
        "resolution (now 64)",
        "network dim (now 2)",
        "gradient checkpointing",
        "AdamW8bit",
    ):
        assert advice in status.message
    gc.collect()
    assert models and models[0]() is None  # the failed run let go of its model
    jobs.start(training_work(version, [config], demo_ckpt, "cpu"))
    assert jobs.wait(120).state == FINISHED


def test_a_full_disk_keeps_the_old_file_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "settings.json"
    fileio.write_json(target, {"old": True})
    real_write = Path.write_bytes

    def full(self: Path, data: bytes) -> int:
        real_write(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(UserError, match="disk is full while writing settings.json.*earlier files are intact"):
        fileio.write_json(target, {"old": False, "pad": "x" * 1000})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["settings.json"]

    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(UserError, match="disk is full"):
        fileio.write_text(target, "new")
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": True}
    with pytest.raises(UserError, match="too long"):
        fileio.write_text(tmp_path / ("n" * 400), "x")
    assert [p.name for p in tmp_path.iterdir()] == ["settings.json"]


def test_a_full_disk_during_training_keeps_earlier_files_and_the_run_resumes(
    tmp_path: Path, demo_ckpt: Path, pictures: Path, monkeypatch: pytest.MonkeyPatch
):
    config = tiny_config(epochs=2)
    version = make_version(tmp_path, pictures, config)
    real_write = Path.write_bytes

    def full_at_the_last_save(self: Path, data: bytes) -> int:
        if self.name.startswith(".p-v1.safetensors."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_at_the_last_save)
    with pytest.raises(UserError, match="disk is full while writing p-v1.safetensors"):
        Trainer(version, config, demo_ckpt, device="cpu", run_name="full").run()
    monkeypatch.undo()
    run = version.trains_dir / "full"
    assert sorted(p.name for p in run.glob("*.safetensors")) == ["p-v1-000001.safetensors"]
    assert _half_files(run) == [] and _temp_files(run) == []
    assert [p.name for p in state_files(run)] == ["step-00000002-save.state"] and not run_is_finished(run)
    # Space freed: resume saves the last file without training the first epoch again.
    reporter = RecordingReporter()
    result = Trainer(version, config, demo_ckpt, device="cpu", reporter=reporter, resume_from=run).run()
    assert [s.step for s in reporter.steps] == [3, 4]
    assert result.final_file == run / "p-v1.safetensors" and lora_tensors(result.final_file)
    assert [p.name for p in state_files(run)] == ["step-00000004-final.state"] and run_is_finished(run)


def test_states_keep_the_newest_and_the_last_save(tmp_path: Path):
    from train_tools.training.state import FINAL, INTERRUPT, SAVE, TrainState
    from train_tools.training.state_files import save_state

    def state(step: int, kind: str) -> TrainState:
        return TrainState(
            epoch=1,
            batch=step,
            step=step,
            kind=kind,
            finished=False,
            config={},
            base_model_path="",
            base_sha256=None,
            started_at=0.0,
            lora={"w": torch.full((2,), float(step))},
        )

    for step, kind in [(2, SAVE), (4, SAVE), (5, INTERRUPT)]:
        save_state(tmp_path, state(step, kind))
    names = [p.name for p in state_files(tmp_path)]
    assert names == ["step-00000005-interrupt.state", "step-00000004-save.state"]
    save_state(tmp_path, state(7, INTERRUPT))
    names = [p.name for p in state_files(tmp_path)]
    assert names == ["step-00000007-interrupt.state", "step-00000004-save.state"]
    assert torch.equal(latest_state(tmp_path).lora["w"], torch.full((2,), 7.0))  # type: ignore[union-attr]
    # A damaged newest state falls back to the one before it.
    newest = state_files(tmp_path)[0]
    newest.write_bytes(newest.read_bytes()[:100])
    assert latest_state(tmp_path).step == 4  # type: ignore[union-attr]
    assert not list(state_dir(tmp_path).glob(".*")) and not run_is_finished(tmp_path)
    save_state(tmp_path, state(9, FINAL))
    assert [p.name for p in state_files(tmp_path)] == ["step-00000009-final.state"] and run_is_finished(tmp_path)
