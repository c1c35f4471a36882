"""install.py: installs only what is missing, never changes what is installed, and is quick when all is there."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def install(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("train_tools_install_under_test", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    # Outside the WebUI there is no ``launch`` module; make sure a stray one cannot answer.
    monkeypatch.setitem(sys.modules, "launch", None)
    return module


def write_reqs(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "requirements.txt"
    path.write_text(text, encoding="utf-8")
    return path


def record_pip(monkeypatch: pytest.MonkeyPatch, module: types.ModuleType) -> list[tuple[list[str], str, str]]:
    calls: list[tuple[list[str], str, str]] = []

    def fake_run_pip(args: list[str], description: str) -> None:
        constraints = Path(args[args.index("-c") + 1]).read_text(encoding="utf-8") if "-c" in args else ""
        calls.append((list(args), description, constraints))

    monkeypatch.setattr(module, "run_pip", fake_run_pip)
    monkeypatch.setattr(module.subprocess, "run", lambda *a, **k: pytest.fail(f"pip was run: {a}"))
    return calls


def test_all_present_installs_nothing_and_is_fast(install, monkeypatch, tmp_path):
    calls = record_pip(monkeypatch, install)
    reqs = write_reqs(tmp_path, "pytest>=7\nPillow>=1.0 ; python_version >= '3'\n")
    start = time.perf_counter()
    assert install.install(reqs) == []
    assert time.perf_counter() - start < 2.0
    assert calls == []


def test_real_requirements_all_present_installs_nothing(install, monkeypatch):
    # CI installs requirements.txt (or lets install.py add what the WebUI pins lack) before the tests.
    calls = record_pip(monkeypatch, install)
    if install.missing_requirements(ROOT / "requirements.txt"):
        calls.clear()
        pytest.skip("this environment lacks some of requirements.txt; run install.py first")
    assert install.install(ROOT / "requirements.txt") == []
    assert calls == []


def test_missing_package_is_asked_for_alone_with_installed_versions_as_constraints(install, monkeypatch, tmp_path):
    calls = record_pip(monkeypatch, install)
    reqs = write_reqs(
        tmp_path,
        "# comment\nPillow>=9.5.0\nsafetensors>=0.4.2\nsurely-not-installed-pkg-xyz>=1.2 ; python_version >= '3'\n",
    )
    asked = install.install(reqs)
    assert asked == ["surely-not-installed-pkg-xyz>=1.2"]
    ((args, _desc, constraints),) = calls
    assert args[:2] == ["install", "surely-not-installed-pkg-xyz>=1.2"]
    # Every installed package is pinned to its installed version: pip cannot upgrade or downgrade any.
    pins = dict(line.split("==", 1) for line in constraints.splitlines() if line)
    pinned = {install.normalize(k): v for k, v in pins.items()}
    assert pinned[install.normalize("safetensors")] == importlib.metadata.version("safetensors")
    assert pinned[install.normalize("pillow")] == importlib.metadata.version("pillow")
    assert "surely-not-installed-pkg-xyz" not in pinned


def test_installed_but_older_than_asked_is_left_alone(install, monkeypatch, tmp_path, caplog):
    calls = record_pip(monkeypatch, install)
    reqs = write_reqs(tmp_path, "safetensors>=999.0\n")
    assert install.install(reqs) == []
    assert calls == []
    assert "leaving it as it is" in caplog.text


def test_host_stack_and_other_platforms_are_never_installed(install, monkeypatch, tmp_path):
    calls = record_pip(monkeypatch, install)
    reqs = write_reqs(tmp_path, "torch>=99\nxformers\ngradio==99\nnot-here-pkg-abc ; platform_system == 'NoSuchOS'\n")
    assert install.install(reqs) == []
    assert calls == []


def test_uses_the_webui_launch_helpers_when_present(install, monkeypatch, tmp_path):
    seen: dict[str, list[str]] = {"is_installed": [], "run_pip": []}
    fake_launch = types.SimpleNamespace(
        is_installed=lambda name: seen["is_installed"].append(name) or name != "needed-pkg",
        run_pip=lambda command, desc: seen["run_pip"].append(command),
    )
    monkeypatch.setitem(sys.modules, "launch", fake_launch)
    monkeypatch.setattr(install.subprocess, "run", lambda *a, **k: pytest.fail("pip run outside launch.run_pip"))
    reqs = write_reqs(tmp_path, "numpy>=1.26\nneeded-pkg>=0.3\n")
    assert install.install(reqs) == ["needed-pkg>=0.3"]
    assert seen["is_installed"] == ["numpy", "needed-pkg"]
    (command,) = seen["run_pip"]
    assert command.startswith("install 'needed-pkg>=0.3' -c ") or command.startswith('install "needed-pkg>=0.3" -c ')


def test_main_never_fails_the_webui_start(install, monkeypatch, tmp_path):
    def broken(requirement_path=None):
        raise RuntimeError("pip failed")

    monkeypatch.setattr(install, "install", broken)
    assert install.main() == 0


def test_parse_requirements_reads_names_specs_and_markers(install):
    parsed = install.parse_requirements("a-b>=1 # x\n-r other.txt\nC_d[extra]==2 ; platform_system != 'Darwin'\n\n")
    assert parsed == [("a-b", ">=1", ""), ("C_d", "==2", "platform_system != 'Darwin'")]


def test_old_host_libraries_cap_the_missing_package(install, monkeypatch, tmp_path):
    calls = record_pip(monkeypatch, install)
    host = {"transformers": "4.30.2", "accelerate": "0.21.0"}
    real = install.installed_version
    monkeypatch.setattr(install, "installed_version", lambda name: host.get(name) if name in host else real(name))
    reqs = write_reqs(tmp_path, "diffusers-not-here>=0.31.0\n")
    monkeypatch.setattr(
        install,
        "HOST_CAPS",
        [
            ("diffusers-not-here", "<0.37", [("transformers", "4.48")]),
            ("peft-not-here", "<0.14", [("accelerate", "1.1")]),
        ],
    )
    assert install.install(reqs) == ["diffusers-not-here>=0.31.0,<0.37"]
    assert install.host_cap("peft-not-here") == "<0.14"
    host.update(transformers="4.50.0", accelerate="1.2.0")
    assert install.host_cap("diffusers-not-here") == "" and install.host_cap("peft-not-here") == ""
    assert len(calls) == 1


def _freeze_versions(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            out[name.strip().lower().replace("_", "-")] = version.strip()
    return out


@pytest.mark.skipif(
    not (Path(sys.prefix) / "freeze-before-install.txt").is_file(),
    reason="runs in the WebUI host environments that 'python standalone.py test' builds",
)
def test_in_a_host_environment_install_changed_no_version_and_has_nothing_left_to_do(install):
    # standalone.py froze this environment with only the host's pins, then ran install.py in it.
    before = _freeze_versions((Path(sys.prefix) / "freeze-before-install.txt").read_text())
    now = {normalized: importlib.metadata.version(normalized) for normalized in before}
    assert now == before
    added = _freeze_versions((Path(sys.prefix) / "freeze-after-install.txt").read_text()).keys() - before.keys()
    assert "diffusers" in added or "diffusers" in before
    # A second run (every WebUI start) would install nothing, and what was added works with the host's pins.
    assert install.missing_requirements() == []
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    from diffusers import StableDiffusionPipeline  # noqa: F401 - the import old hosts broke on


def test_a_gpu_build_of_onnxruntime_counts_as_onnxruntime(install, monkeypatch, tmp_path):
    """A WebUI with onnxruntime-gpu (a tagger extension put it there) must not get the CPU package beside it."""
    calls = record_pip(monkeypatch, install)
    real = install.installed_version
    monkeypatch.setattr(
        install,
        "installed_version",
        lambda name: "1.17.1" if name == "onnxruntime-gpu" else None if name == "onnxruntime" else real(name),
    )
    reqs = write_reqs(tmp_path, "onnxruntime>=1.16\n")
    assert install.install(reqs) == [] and calls == []
    monkeypatch.setattr(install, "installed_version", lambda name: None if "onnxruntime" in name else real(name))
    assert install.install(reqs) == ["onnxruntime>=1.16"]


def test_bitsandbytes_is_not_added_to_a_webui_but_the_rest_still_is(install, monkeypatch, tmp_path):
    """Once installed, bitsandbytes is imported by the WebUI's own libraries at every start (before any
    extension can quiet it) and prints 'Failed to load CPU gemm_4bit_forward' on CPUs with AVX512-BF16: the
    extension must not be what put it there. The standalone app still lists it (requirements.txt)."""
    calls = record_pip(monkeypatch, install)
    real = install.installed_version
    gone = {"bitsandbytes", "prodigyopt"}
    monkeypatch.setattr(
        install, "installed_version", lambda name: None if install.normalize(name) in gone else real(name)
    )
    assert install.install(ROOT / "requirements.txt") == ["prodigyopt>=1.0"]
    assert [c[0][1] for c in calls] == ["prodigyopt>=1.0"]
    assert any(
        name == "bitsandbytes"
        for name, _spec, _marker in install.parse_requirements((ROOT / "requirements.txt").read_text(encoding="utf-8"))
    )


def test_the_quieted_bitsandbytes_notice_is_that_one_line_only(caplog):
    """Where Train Tools is imported first (the app, the CLI), the missing-kernel notice is dropped; every
    other bitsandbytes message, from that logger too, still shows."""
    import logging

    import train_tools  # noqa: F401 - installs the filter

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
            "already `pip install kernels`",
            "No module named 'kernels'",
        )
        logger.warning("something else went wrong in the CPU backend")
        logging.getLogger("bitsandbytes.cextension").warning(
            "The installed version of bitsandbytes was compiled without GPU support."
        )
    messages = [r.getMessage() for r in caplog.records]
    assert not any("gemm_4bit_forward" in m for m in messages)
    assert "something else went wrong in the CPU backend" in messages
    assert any("compiled without GPU support" in m for m in messages)
