"""Set up and run Train Tools outside the WebUI, with nothing but Python 3.10-3.12 installed.

    python standalone.py            # first run: creates .venv and installs; then opens the app
    python standalone.py test       # same set-up plus the test tools, then ruff and mypy, then the test suite,
                                    # here and in one environment per WebUI host (tests/hosts/*.txt: the host's
                                    # pins + what install.py adds); TRAIN_TOOLS_HOSTS=none skips those, =a1111
                                    # picks one
    python standalone.py -- ARGS    # any command of 'python -m train_tools', e.g. -- train NAME v1

The set-up is skipped when it is already done (a stamp file records what was installed). PyTorch is installed
as ``torch==$TRAIN_TOOLS_TORCH`` (default below) unless the environment already has a torch; set
TRAIN_TOOLS_TORCH_INDEX to a PyTorch wheel index URL to pick a specific CUDA build.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("TRAIN_TOOLS_VENV", ROOT / ".venv"))
TORCH = os.environ.get("TRAIN_TOOLS_TORCH", "2.13.0")
OPEN_CLIP = "open-clip-torch==2.20.0"
HOST_TEST_TOOLS = ("pytest", "onnx")  # onnx builds the tiny WD14 tagger of tests/test_captioners.py
log = logging.getLogger("standalone")


def venv_python(venv_dir: Path = VENV) -> Path:
    return venv_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def pip(*args: str, venv_dir: Path = VENV) -> None:
    cmd = [str(venv_python(venv_dir)), "-m", "pip", "--disable-pip-version-check", *args]
    log.info("$ %s", " ".join(cmd[1:]))
    subprocess.check_call(cmd)


def ensure_env(with_tests: bool) -> None:
    files = [ROOT / "requirements.txt", ROOT / "tests" / "constraints.txt"]
    if with_tests:
        files.append(ROOT / "tests" / "requirements.txt")
    digest = hashlib.sha256(
        b"".join(f.read_bytes() for f in files if f.exists()) + (TORCH + OPEN_CLIP).encode()
    ).hexdigest()
    stamp = VENV / f".train_tools_installed_{'test' if with_tests else 'app'}"
    if stamp.exists() and stamp.read_text() == digest and venv_python().exists():
        return
    if not venv_python().exists():
        log.info("Creating %s", VENV)
        venv.create(VENV, with_pip=True)
    has_torch = subprocess.call([str(venv_python()), "-c", "import torch"], stderr=subprocess.DEVNULL) == 0
    if not has_torch:
        index = os.environ.get("TRAIN_TOOLS_TORCH_INDEX")
        extra = ["--index-url", index] if index else []
        pip("install", f"torch=={TORCH}", *extra)
    pins = ROOT / "tests" / "constraints.txt"
    constraints = ["-c", str(pins)] if pins.exists() else []
    reqs = ["-r", str(ROOT / "requirements.txt")]
    if with_tests:
        reqs += ["-r", str(ROOT / "tests" / "requirements.txt")]
    pip("install", *reqs, *constraints)
    # Only for its CLIP vocabulary file (what real SD checkpoints need to tokenise offline): its own
    # dependencies (torchvision, timm) would pull another torch, and the file is all Train Tools reads.
    pip("install", "--no-deps", OPEN_CLIP)
    stamp.write_text(digest)


def ensure_browser() -> None:
    """The browser test drives Debian's Chromium; install it when we can (root with apt-get), else it skips."""
    if shutil.which("chromium") or Path("/usr/bin/chromium").exists():
        return
    if not shutil.which("apt-get") or not hasattr(os, "geteuid") or os.geteuid() != 0:
        log.info("Chromium is not installed: the browser test will be skipped.")
        return
    log.info("Installing Chromium for the browser test (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def quiet(cmd: list[str]) -> int:
        return subprocess.call(cmd, stdout=subprocess.DEVNULL, env=env)

    if (
        quiet(["apt-get", "update", "-q"]) != 0
        or quiet(["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]) != 0
    ):
        log.warning("Could not install Chromium: the browser test will be skipped.")


def freeze(venv_dir: Path) -> str:
    return subprocess.run(
        [str(venv_python(venv_dir)), "-m", "pip", "--disable-pip-version-check", "freeze", "--all"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def ensure_host_env(pins: Path) -> Path:
    """A venv with a WebUI host's pinned packages, then the extension installed into it the way the WebUI does
    it (``python install.py``), then pytest added without changing anything (the installed versions are the
    constraints). ``freeze-before-install.txt`` keeps the host's own state for tests/test_install.py."""
    venv_dir = ROOT / f".venv-{pins.stem}"
    digest = hashlib.sha256(
        pins.read_bytes()
        + (ROOT / "requirements.txt").read_bytes()
        + (ROOT / "install.py").read_bytes()
        + (TORCH + " ".join(HOST_TEST_TOOLS)).encode()
    ).hexdigest()
    stamp = venv_dir / ".train_tools_host_env"
    if stamp.exists() and stamp.read_text() == digest and venv_python(venv_dir).exists():
        return venv_dir
    if venv_dir.exists():
        shutil.rmtree(venv_dir)
    log.info("Creating %s with the pins of %s", venv_dir.name, pins.relative_to(ROOT))
    venv.create(venv_dir, with_pip=True)
    extra = ["--index-url", os.environ["TRAIN_TOOLS_TORCH_INDEX"]] if "TRAIN_TOOLS_TORCH_INDEX" in os.environ else []
    pip("install", "-q", f"torch=={TORCH}", *extra, venv_dir=venv_dir)
    pip("install", "-q", "-r", str(pins), f"torch=={TORCH}", venv_dir=venv_dir)
    (venv_dir / "freeze-before-install.txt").write_text(freeze(venv_dir))
    env = {**os.environ, "PYTHONPATH": ""}
    subprocess.check_call([str(venv_python(venv_dir)), str(ROOT / "install.py")], cwd=ROOT, env=env)
    constraints = venv_dir / "freeze-after-install.txt"
    constraints.write_text(freeze(venv_dir))
    # The test tools (not the browser one), held to what is installed: nothing of the host changes.
    pip("install", "-q", *HOST_TEST_TOOLS, "-c", str(constraints), venv_dir=venv_dir)
    stamp.write_text(digest)
    return venv_dir


def run_host_suites(pytest_args: list[str], env: dict[str, str]) -> int:
    """The suite again in each host's environment (not the browser test: the browser drives the standalone app)."""
    wanted = os.environ.get("TRAIN_TOOLS_HOSTS", "all")
    if wanted == "none":
        return 0
    rc = 0
    for pins in sorted((ROOT / "tests" / "hosts").glob("*.txt")):
        if wanted != "all" and pins.stem not in wanted.split(","):
            continue
        venv_dir = ensure_host_env(pins)
        log.info("Running the tests in the %s environment", pins.stem)
        host_env = {**env, "TRAIN_TOOLS_HOST_ENV": pins.stem}
        code = subprocess.call(
            [
                str(venv_python(venv_dir)),
                "-m",
                "pytest",
                "-p",
                "no:cacheprovider",
                "--ignore=tests/test_browser.py",
                *pytest_args,
            ],
            cwd=ROOT,
            env=host_env,
        )
        rc = rc or code
    return rc


def check_code(env: dict[str, str]) -> int:
    """The linter and the type checker, before the suite (their settings are in pyproject.toml); a finding
    stops the tests: keep both at zero."""
    for name, cmd in (
        ("ruff", ["-m", "ruff", "check", "."]),
        ("ruff format", ["-m", "ruff", "format", "--check", "."]),
        ("mypy", ["-m", "mypy"]),
    ):
        log.info("Checking the code: %s", name)
        code = subprocess.call([str(venv_python()), *cmd], cwd=ROOT, env=env)
        if code != 0:
            log.error("%s found problems (above); fix them, then run the tests again.", name)
            return code
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[standalone] %(message)s")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if argv[:1] == ["test"]:
        ensure_env(with_tests=True)
        ensure_browser()
        env.setdefault("HF_HUB_OFFLINE", "1")
        if check_code(env) != 0:
            return 1
        rc = subprocess.call([str(venv_python()), "-m", "pytest", *argv[1:]], cwd=ROOT, env=env)
        return run_host_suites(argv[1:], env) or rc
    ensure_env(with_tests=False)
    args = argv[1:] if argv[:1] == ["--"] else argv
    # Run from the user's folder so relative paths they type mean what they expect.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.call([str(venv_python()), "-m", "train_tools", *args], env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
