"""Small stand-ins shared by several test files: the fake WebUI (its module purge and the ``webui`` fixture)
and a booby-trapped pickle."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

FAKE_WEBUI = Path(__file__).resolve().parent / "fake_webui"


def purge_fake_webui() -> None:
    """Forget the stand-in ``modules`` (and ``launch``) so the next test imports them fresh."""
    for name in list(sys.modules):
        if name == "modules" or name.startswith("modules.") or name == "launch":
            del sys.modules[name]


@pytest.fixture()
def webui(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[types.SimpleNamespace]:
    """The stand-in WebUI with a data folder of its own, two checkpoints, and --ckpt-dir/--lora-dir unset.
    A test module uses it as ``webui = stand_ins.webui``."""
    purge_fake_webui()
    monkeypatch.syspath_prepend(str(FAKE_WEBUI))
    from modules import call_queue, devices, paths_internal, processing, script_callbacks, sd_models, shared

    data = tmp_path / "webui"
    monkeypatch.setattr(paths_internal, "data_path", str(data))
    monkeypatch.setattr(paths_internal, "models_path", str(data / "models"))
    sd_dir = data / "models" / "Stable-diffusion"
    (sd_dir / "anime").mkdir(parents=True)
    (sd_dir / "real.safetensors").write_bytes(b"x")
    (sd_dir / "anime" / "toon.safetensors").write_bytes(b"y")
    sd_models.list_models()
    script_callbacks.clear()
    yield types.SimpleNamespace(
        data=data,
        sd_dir=sd_dir,
        call_queue=call_queue,
        devices=devices,
        processing=processing,
        script_callbacks=script_callbacks,
        sd_models=sd_models,
        shared=shared,
    )
    purge_fake_webui()


class MakesAFile:
    """Unpickling this calls open(marker, "w"): it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))
