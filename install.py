"""Run by Stable Diffusion WebUI at every start (and after "Install from URL"): add what Train Tools misses.

Rules, because an extension's installer is the usual way users' WebUIs break:
- only packages from requirements.txt that are NOT installed at all are installed; an installed package is
  never upgraded or downgraded, even if it is older than requirements.txt asks (a warning says so);
- the host's own stack (torch, torchvision, xformers, gradio) is never touched, and nothing the host would then
  import at every start with a warning of its own is added (bitsandbytes: see NOT_IN_WEBUI);
- no git, no network unless something is missing, and nothing but a few metadata look-ups when all is there.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("train_tools.install")

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements.txt"
# The WebUI owns these; installing or upgrading any of them is how extensions break WebUIs.
NEVER_INSTALL = {"torch", "torchvision", "torchaudio", "xformers", "gradio", "gradio-client"}

# In requirements.txt for the standalone app, never installed into a WebUI by this file. bitsandbytes: only the
# 8-bit optimizers use it, and once it is installed the WebUI's own libraries import it at every start, before
# any extension runs (transformers 4.30's modeling_utils in A1111, peft in Forge); on CPUs with AVX512-BF16
# its recent releases then print "Failed to load CPU gemm_4bit_forward from kernels-community ..." at every
# WebUI start. Where the WebUI has it already, it is used; otherwise choosing an 8-bit optimizer says how to
# add it.
NOT_IN_WEBUI = {"bitsandbytes"}

# Newer releases of these declare requirements that an old host satisfies on paper but not in fact (checked
# in an A1111 1.10 environment, transformers 4.30.2 + accelerate 0.21.0: diffusers 0.32-0.37 fail to import
# StableDiffusionPipeline (SiglipImageProcessor, Dinov2WithRegistersConfig missing); peft 0.14+ needs
# transformers.Cache and a newer accelerate). When the host has the older library, the missing package is
# capped to the last release known to work there (the versions Forge pins). (package, cap, [(host package,
# version below)])
HOST_CAPS = [
    ("diffusers", "<0.32", [("transformers", "4.48")]),
    ("peft", "<0.14", [("transformers", "4.46"), ("accelerate", "1.1")]),
]

# Other distributions of the same module: a WebUI with onnxruntime-gpu must not get the CPU package beside it
# (both install the module ``onnxruntime``; the second one breaks the first).
ALTERNATIVES = {
    "onnxruntime": ("onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-silicon", "onnxruntime-openvino")
}

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirements(text: str) -> list[tuple[str, str, str]]:
    """(name, version specifier, environment marker) per requirement line; comments and options skipped."""
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        requirement, _, marker = line.partition(";")
        match = _NAME.match(requirement)
        if not match:
            continue
        out.append((match.group(1), match.group(3).strip(), marker.strip()))
    return out


def marker_applies(marker: str) -> bool:
    """Whether an environment marker holds here (``packaging`` when available; it is in every WebUI)."""
    if not marker:
        return True
    try:
        from packaging.markers import Marker

        return bool(Marker(marker).evaluate())
    except ImportError:
        # Without packaging only the one kind of marker requirements.txt uses is understood.
        import platform

        m = re.fullmatch(r'platform_system\s*(==|!=)\s*["\']([^"\']+)["\']', marker)
        if not m:
            return True
        equal = platform.system() == m.group(2)
        return equal if m.group(1) == "==" else not equal


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_installed(name: str) -> bool:
    """The WebUI's own check when we run inside it, else the package metadata; another distribution of the
    same module (``ALTERNATIVES``) counts as installed."""
    return any(_is_installed(n) for n in (name, *ALTERNATIVES.get(normalize(name), ())))


def _is_installed(name: str) -> bool:
    try:
        import launch  # the WebUI's launch.py, on the path when the WebUI runs this file

        return bool(launch.is_installed(name))
    except (ImportError, AttributeError):
        return installed_version(name) is not None


def _older_than(version: str, bound: str) -> bool:
    def key(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", v.split("+")[0])[:3])

    try:
        from packaging.version import Version

        return Version(version) < Version(bound)
    except (ImportError, ValueError):
        return key(version) < key(bound)


def host_cap(name: str) -> str:
    """An extra upper bound for ``name`` when the host's installed libraries are older than its new releases need."""
    for package, cap, conditions in HOST_CAPS:
        if normalize(package) != normalize(name):
            continue
        for host_package, below in conditions:
            version = installed_version(host_package)
            if version is not None and _older_than(version, below):
                return cap
    return ""


def missing_requirements(path: Path = REQUIREMENTS) -> list[str]:
    """Requirement strings (``name>=x``) for the packages requirements.txt lists that are not installed."""
    missing = []
    for name, spec, marker in parse_requirements(path.read_text(encoding="utf-8")):
        if normalize(name) in NEVER_INSTALL | NOT_IN_WEBUI or not marker_applies(marker):
            continue
        if is_installed(name):
            version = installed_version(name)
            if version is not None and spec and not _satisfies(version, spec):
                log.warning(
                    "Train Tools: %s %s is installed, requirements.txt asks %s; leaving it as it is.",
                    name,
                    version,
                    spec,
                )
            continue
        cap = host_cap(name)
        missing.append(f"{name}{spec}{',' if spec and cap else ''}{cap}")
    return missing


def _satisfies(version: str, spec: str) -> bool:
    try:
        from packaging.specifiers import SpecifierSet

        return SpecifierSet(spec).contains(version, prereleases=True)
    except (ImportError, ValueError):
        return True


def installed_constraints() -> str:
    """``name==version`` for every installed distribution.

    Installing with these as pip constraints (rather than ``--no-deps``) lets pip add the missing package's
    own missing dependencies, while any version change of something already installed is impossible: pip
    picks a release of the missing package that works with what is there, or fails without changing
    anything. ``--no-deps`` could leave a new package without a dependency it needs.
    """
    seen = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if name and dist.version and normalize(name) not in seen:
            seen[normalize(name)] = f"{name}=={dist.version}"
    return "\n".join(sorted(seen.values())) + "\n"


def _write_constraints(folder: Path) -> Path:
    target = folder / "train_tools_constraints.txt"
    try:
        sys.path.insert(0, str(HERE))
        from train_tools.fileio import write_text

        write_text(target, installed_constraints())
    except ImportError:
        target.write_text(installed_constraints(), encoding="utf-8")
    finally:
        if sys.path and sys.path[0] == str(HERE):
            sys.path.pop(0)
    return target


def run_pip(args: list[str], description: str) -> None:
    """The WebUI's ``launch.run_pip`` when we run inside it (same index, same output), else pip directly."""
    try:
        import launch

        run = launch.run_pip
    except (ImportError, AttributeError):
        run = None
    if run is not None:
        # launch.run_pip takes one shell-style string and prepends "python -m pip".
        run(" ".join(_quote(a) for a in args), description)
        return
    log.info("Installing %s", description)
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def _quote(arg: str) -> str:
    # launch.run_pip runs through the shell; cmd.exe needs double quotes, POSIX shells accept them too.
    if os.name == "nt":
        return f'"{arg}"' if any(c in arg for c in " <>|&^") else arg
    return shlex.quote(arg)


def install(path: Path = REQUIREMENTS) -> list[str]:
    """Install what is missing; return what was asked of pip (empty when all is there)."""
    missing = missing_requirements(path)
    if not missing:
        return []
    with tempfile.TemporaryDirectory(prefix="train_tools_install_") as tmp:
        constraints = _write_constraints(Path(tmp))
        for requirement in missing:
            run_pip(["install", requirement, "-c", str(constraints)], f"Train Tools requirement: {requirement}")
    return missing


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        install()
    except (subprocess.CalledProcessError, RuntimeError) as exc:
        # Never stop the WebUI from starting: the tab says what is missing when it is used.
        log.error("Train Tools: could not install a requirement (%s); the tab may not work until it is installed.", exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
