"""The package's tree keeps its architecture: imports go one way, from the entry points, the UI and the hosts
down to the core (lazy imports inside functions included), no module imports another in a circle, every
subpackage says what it owns and may import, and no module grows past about 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "train_tools"

#: Who may import whom: a module may import its own group and any group of a lower rank. data and models share
#: a rank and may not import each other.
RANKS = {
    "core": 0,
    "data": 1,
    "models": 1,
    "networks": 2,
    "previews": 3,
    "training": 4,
    "hosts": 5,
    "ui": 6,
    "entry": 7,
    "bench": 7,
}
#: The top-level modules that are entry points rather than core: they may reach everything. ``bench_quality``
#: is the short name of a benchmark (``python -m train_tools.bench_quality``): it belongs to ``bench``.
ENTRY = {"cli", "commands", "__main__"}
BENCH = {"bench_quality"}
MAX_LINES = 420  # "about 400"
# The one settings dataclass is the exception: every training parameter is a field of it (about 8 lines each, its
# label, help, metadata key and range), and splitting it would list the settings in two places.
LONGER = {"config.py": 800}


def module_name(path: Path) -> str:
    parts = list(path.with_suffix("").relative_to(PACKAGE.parent).parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def group(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "core"
    if (PACKAGE / parts[1]).is_dir():
        return parts[1]
    if parts[1] in BENCH:
        return "bench"
    return "entry" if parts[1] in ENTRY else "core"


def resolve(module: str, name: str) -> str:
    """``module.name`` when that is a module of the package, else ``module``."""
    candidate = PACKAGE.parent / Path(*f"{module}.{name}".split("."))
    return f"{module}.{name}" if candidate.with_suffix(".py").exists() or candidate.is_dir() else module


def imports(path: Path) -> set[str]:
    """The package's modules that ``path`` imports, anywhere in it (function bodies too)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "train_tools":
                found |= {resolve(target, alias.name) for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "train_tools"}
    return found - {module}


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_imports_go_down_the_layers():
    wrong = []
    for module, targets in sorted(GRAPH.items()):
        for target in sorted(targets):
            a, b = group(module), group(target)
            if a != b and (RANKS[b] > RANKS[a] or RANKS[b] == RANKS[a]):
                wrong.append(f"{module} ({a}) imports {target} ({b})")
    assert wrong == []


def test_no_import_circles():
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH.get(module, ())):
            # A package's __init__ is imported with every module of it; it holds only a docstring here.
            if state.get(target) == 1:
                circles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert circles == []


@pytest.mark.parametrize("package", sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()))
def test_each_subpackage_says_what_it_owns_and_may_import(package: str):
    init = PACKAGE / package / "__init__.py"
    tree = ast.parse(init.read_text(encoding="utf-8"))
    doc = ast.get_docstring(tree) or ""
    assert len(doc) > 80 and "import" in doc, f"{package}/__init__.py: say what it owns and what it may import"
    # Nothing but the docstring: importing a subpackage costs nothing (the WebUI imports hosts at start).
    assert all(isinstance(node, ast.Expr) for node in tree.body) or package == "bench"


def test_no_module_over_about_400_lines():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > LONGER.get(str(p.relative_to(PACKAGE)), MAX_LINES)
    }
    assert long == {}


def test_captions_cached_before_the_split_stay_cached(monkeypatch: pytest.MonkeyPatch):
    """A prepared folder's manifest caches automatic captions under the captioner's id, which names its module:
    the WD14 and BLIP captioners moved, and their id still names the module they had, so a folder prepared
    before keeps its captions instead of captioning every picture again."""
    from train_tools.data.blip import BlipCaptioner
    from train_tools.data.prepare_folder import _captioner_id
    from train_tools.data.wd14 import WD14Tagger

    for cls in (WD14Tagger, BlipCaptioner):
        monkeypatch.setattr(cls, "__repr__", lambda self, name=cls.__name__: f"{name}(settings)")
        captioner = cls.__new__(cls)  # no model needed: the id is the module and the repr
        assert _captioner_id(captioner) == f"train_tools.captioners.{cls.__name__}(settings)"
