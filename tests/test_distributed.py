"""Data-parallel training: two CPU processes (torch.distributed over gloo, set up by accelerate from the same
environment variables ``accelerate launch`` and ``torchrun`` set) train the tiny model through the command
line. Both train on their own share of the batches, their LoRA weights are equal after every step, and one
set of files is written.

Run as a script, this file is the worker: it runs ``python -m train_tools train ...`` in-process with hooks
that record, after every step, a hash of the LoRA weights, the learning rate and the batch it trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SETTINGS = {
    "resolution": "128",
    "min_bucket_reso": "64",
    "max_bucket_reso": "256",
    "network_dim": "4",
    "network_alpha": "2",
    "repeats": "1",
    "batch_size": "1",
    "epochs": "2",
    "save_every_n_epochs": "1",
    "optimizer": "AdamW",
    "lr_scheduler": "linear",
    "learning_rate": "1e-3",
    "save_precision": "fp32",
    "mixed_precision": "no",
    # The defaults that matter here: the text encoder is trained and clip skip 2 leaves its last layer unused.
    "train_text_encoder": "true",
    "clip_skip": "2",
}


def _worker(data_dir: Path, ckpt: Path, out_dir: Path) -> int:
    """One rank: train through the CLI, then write what it saw to ``out_dir/rank<N>.json``/``.safetensors``."""
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import save_file

    from train_tools import cli, progress
    from train_tools.training.trainer import Trainer

    trainers: list[Trainer] = []
    record: dict[str, list] = {"hashes": [], "lrs": [], "batches": [], "epochs": []}
    original_prepare, original_latents = Trainer.prepare, Trainer.latents_for

    def prepare(self: Trainer) -> None:
        trainers.append(self)
        original_prepare(self)

    def latents_for(self: Trainer, indices: list[int], *args: object) -> torch.Tensor:
        record["batches"].append(list(indices))
        return original_latents(self, indices, *args)

    def step(self: progress.TerminalReporter, info: progress.StepInfo) -> None:
        digest = hashlib.sha256()
        for p in trainers[-1].trainable:
            digest.update(p.detach().float().cpu().numpy().tobytes())
        record["hashes"].append(digest.hexdigest())
        record["lrs"].append(info.lr)
        record["epochs"].append(info.epoch)

    Trainer.prepare, Trainer.latents_for = prepare, latents_for  # type: ignore[method-assign]
    progress.TerminalReporter.step = step  # type: ignore[method-assign]
    args = ["--data-dir", str(data_dir), "train", "p", "v1", "--ckpt", str(ckpt), "--device", "cpu"]
    settings = {**TRAIN_SETTINGS, "network_type": os.environ.get("TEST_NETWORK_TYPE", "lora")}
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    rc = cli.main(args)
    trainer = trainers[-1]
    rank = trainer.accelerator.process_index
    record.update(rc=rc, num_processes=trainer.accelerator.num_processes, total_steps=trainer.total_steps)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record), encoding="utf-8")
    save_file(
        {str(i): p.detach().float().cpu().contiguous() for i, p in enumerate(trainer.trainable)},
        str(out_dir / f"rank{rank}.safetensors"),
    )
    return rc


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Wait for every process; when one fails the others would wait for it forever, so they are stopped."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    return [p.returncode for p in procs]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# LoRA, and DoRA: its magnitudes and input scaling (networks/dora.py) are the one network type written here
# rather than by peft.
@pytest.mark.parametrize("network_type", ("lora", "dora"))
def test_two_processes_train_in_step_and_write_one_set_of_files(tmp_path: Path, network_type: str) -> None:
    import torch
    from safetensors.torch import load_file

    from train_tools.cli import main
    from train_tools.data.demo_dataset import make_demo_dataset
    from train_tools.models.demo_model import build_demo_checkpoint
    from train_tools.store import Store

    ckpt = build_demo_checkpoint(tmp_path / "demo.safetensors")
    make_demo_dataset(tmp_path / "pictures", n=4)
    data = tmp_path / "data"
    for args in (
        ["project", "create", "p"],
        ["version", "create", "p", "v1"],
        ["dataset", "add", "p", "v1", str(tmp_path / "pictures")],
    ):
        assert main(["--data-dir", str(data), *args]) == 0
    out = tmp_path / "out"
    out.mkdir()

    port = _free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "ACCELERATE_USE_CPU": "true",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TEST_NETWORK_TYPE": network_type,
        }
        log = open(tmp_path / f"rank{rank}.log", "wb")  # noqa: SIM115 - closed below, after the process ends
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, __file__, str(data), str(ckpt), str(out)],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    codes = _wait_all([proc for proc, _ in procs], timeout=300)
    for _, log in procs:
        log.close()
    logs = "\n".join((tmp_path / f"rank{r}.log").read_text(errors="replace")[-3000:] for r in range(2))
    assert codes == [0, 0], logs

    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["rc"] == r1["rc"] == 0
    assert r0["num_processes"] == r1["num_processes"] == 2
    # 4 pictures x 1 repeat = 4 batches per epoch, 2 for each process; 2 epochs.
    assert r0["total_steps"] == r1["total_steps"] == 4
    assert len(r0["hashes"]) == len(r1["hashes"]) == 4
    # In step: the same weights after every step, and they move at every step.
    assert r0["hashes"] == r1["hashes"]
    assert len(set(r0["hashes"])) == 4
    # The learning-rate schedule spans the whole run (linear: 1e-3 * (1 - step / 4)), not half of it.
    expected_lrs = [1e-3 * (1 - k / 4) for k in range(1, 5)]
    assert r0["lrs"] == pytest.approx(expected_lrs) and r1["lrs"] == pytest.approx(expected_lrs)
    # Each process trained on its own half of every epoch's batches.
    for epoch in (1, 2):
        mine = [b for b, e in zip(r0["batches"], r0["epochs"], strict=False) if e == epoch]
        theirs = [b for b, e in zip(r1["batches"], r1["epochs"], strict=False) if e == epoch]
        assert len(mine) == len(theirs) == 2
        assert sorted(i for b in mine + theirs for i in b) == [0, 1, 2, 3]
    w0, w1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert w0.keys() == w1.keys() and len(w0) > 0
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key

    # One run folder, written once: its LoRA files and snapshot, no half-written or second copies.
    (run,) = Store(data).version("p", "v1").runs()
    assert sorted(p.name for p in run.glob("*.safetensors")) == ["p-v1-000001.safetensors", "p-v1.safetensors"]
    assert sorted(p.name for p in run.glob("*.json")) == ["captions.json", "settings.json"]
    assert not [p for p in run.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    scales = [k for k in load_file(str(run / "p-v1.safetensors")) if k.endswith(".dora_scale")]
    assert bool(scales) == (network_type == "dora")


if __name__ == "__main__":
    sys.exit(_worker(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
