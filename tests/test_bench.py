"""The benchmark command: it runs end to end on the CPU and prints its tables; its presets and GPU table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from train_tools.bench.report import peak_tflops
from train_tools.bench.speed import build_parser, specs_from_args
from train_tools.bench.timing import PHASES
from train_tools.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "flags, title",
    [
        ([], "sd1 tiny · 128x128 · batch 2"),
        # channels_last converts the frozen UNet and leaves the flat LoRA weights in place; --no-flat keeps the
        # LoRA weights separate (what the layout gives is measured against it).
        (["--channels-last"], "channels_last"),
        (["--no-flat"], "LoRA weights as separate tensors"),
    ],
)
def test_cpu_tiny_preset_runs_and_prints_the_tables(tmp_path: Path, flags: list[str], title: str):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train_tools.bench.speed",
            "--preset",
            "cpu-tiny",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--phase-steps",
            "1",
            "--work-dir",
            str(tmp_path),
            *flags,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for header in (
        "| metric | value |",
        "| steps/s (steady state) |",
        "| images/s |",
        "| time to first step |",
        "| peak memory | process RSS",
        "| bare UNet fwd+bwd (bound) |",
        "| trainer overhead |",
        "| model FLOPs/step |",
        "| phase | ms/step | share |",
        title,
    ):
        assert header in out, header
    for phase in PHASES:
        assert f"| {phase} |" in out, phase
    assert "Not measured" not in out and "| MFU |" not in out  # no MFU on a CPU
    # The run's data folder is removed; the demo model is kept for the next run.
    assert [p.name for p in tmp_path.iterdir()] == ["models"]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H100 80GB HBM3", ("H100 SXM", 989.0)),
        ("NVIDIA H100 PCIe", ("H100 PCIe", 756.0)),
        ("NVIDIA H200", ("H200", 989.0)),
        ("NVIDIA A100-SXM4-80GB", ("A100", 312.0)),
        ("NVIDIA L40S", ("L40S", 362.0)),
        ("NVIDIA GeForce RTX 4090", ("RTX 4090", 165.0)),
        ("NVIDIA GeForce RTX 3090", ("RTX 3090", 71.0)),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA GeForce RTX 3090 Ti", None),
        ("Tesla T4", None),
    ],
)
def test_peak_rates_only_for_known_gpus(name: str, expected: tuple[str, float] | None):
    assert peak_tflops(name) == expected


def test_presets_and_overrides():
    parse = build_parser().parse_args
    sd15 = specs_from_args(parse(["--preset", "gpu-sd15", "--device", "cuda"]))
    assert sorted((s.batch, s.gradient_checkpointing, s.optimizer) for s in sd15) == [
        (1, False, "Lion"),
        (1, True, "AdamW8bit"),
        (1, True, "Lion"),
        (4, False, "Lion"),
        (4, True, "Lion"),
    ]
    assert {(s.family, s.size, s.resolution) for s in sd15} == {("sd1", "full", 512)}
    assert all(s.mixed_precision in ("bf16", "fp16") for s in sd15)
    sdxl = specs_from_args(parse(["--preset", "gpu-sdxl", "--device", "cuda"]))
    assert {(s.family, s.resolution) for s in sdxl} == {("sdxl", 1024)}
    # A flag replaces that dimension in every run of the preset; runs that become equal run once.
    one = specs_from_args(
        parse(
            [
                "--preset",
                "gpu-sd15",
                "--device",
                "cuda",
                "--batch",
                "2",
                "--no-gradient-checkpointing",
                "--optimizer",
                "AdamW",
                "--compile",
            ]
        )
    )
    assert len(one) == 1 and (one[0].batch, one[0].optimizer, one[0].compile) == (2, "AdamW", True)
    cpu = specs_from_args(parse(["--device", "cpu"]))
    assert [(s.size, s.mixed_precision, s.device) for s in cpu] == [("tiny", "no", "cpu")]
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        specs_from_args(parse(["--preset", "gpu-sd15", "--device", "cpu"]))
    # Mixed precision on the CPU is measured as asked (bf16 against fp32: is it faster here?).
    bf16 = specs_from_args(parse(["--device", "cpu", "--mixed-precision", "bf16"]))
    assert [(s.mixed_precision, s.device) for s in bf16] == [("bf16", "cpu")]


def test_stand_in_tokenizer_has_the_real_size():
    from train_tools.bench.workload import _stand_in_tokenizer
    from train_tools.models.tokenizers import REAL_VOCAB_SIZE

    tok = _stand_in_tokenizer("!")
    assert len(tok) == REAL_VOCAB_SIZE
    ids = tok("a photo of a cat")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and max(ids) < REAL_VOCAB_SIZE


@pytest.mark.parametrize("has_bf16", [True, False])
def test_the_cpu_precision_preset_compares_fp32_with_what_this_cpu_can(monkeypatch: pytest.MonkeyPatch, has_bf16):
    from train_tools.training import precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: has_bf16)
    specs = specs_from_args(build_parser().parse_args(["--preset", "cpu-precision", "--device", "cpu"]))
    runs = [(s.size, s.resolution, s.mixed_precision) for s in specs]
    if has_bf16:
        assert runs == [
            ("tiny", 128, "no"),
            ("tiny", 128, "bf16"),
            ("tiny", 128, "fp16"),
            ("full", 256, "no"),
            ("full", 256, "bf16"),
        ]
    else:
        assert runs == [("tiny", 128, "no"), ("tiny", 128, "fp16"), ("full", 256, "no")]
    assert all(s.device == "cpu" for s in specs)
