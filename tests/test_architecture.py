"""The import contract of docs/architecture.md, enforced: layers by subpackage, imports pointing
down only, no cycles, and every module listed in the documented tree."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "safegrpo_pl"
ARCHITECTURE = REPO / "docs" / "architecture.md"
NAME = "safegrpo_pl"


@dataclass(frozen=True)
class Violation:
    importer: str
    imported: str
    why: str

    def __str__(self) -> str:
        return f"{self.importer} imports {self.imported}: {self.why}"


def read_contract(text: str) -> list[list[str]]:
    """The layers, top first, from the ```contract block; each a list of independent parts."""
    block = re.search(r"```contract\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```contract block"
    return [[part.strip() for part in line.split("|")] for line in block[1].strip().splitlines()]


def module_names(package: Path) -> dict[str, Path]:
    """Dotted module name (without the package name) -> file."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every package module that `name` imports: at the top, inside functions, under
    TYPE_CHECKING, and named in a string for importlib."""
    tree = ast.parse(path.read_text())
    package_parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()

    def add(dotted: str) -> None:
        if dotted == NAME:
            found.add("")
        elif dotted.startswith(NAME + "."):
            found.add(dotted[len(NAME) + 1 :])

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                module = ".".join([NAME, *base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:  # `from pkg import module` imports the module
                candidate = f"{module}.{alias.name}"
                add(candidate if candidate[len(NAME) + 1 :] in known else module)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value[len(NAME) + 1 :] in known
            and node.value.startswith(NAME + ".")
        ):
            add(node.value)
    found.discard(name)
    return {m for m in found if m in known or m == ""}


def layer_of(module: str, contract: list[list[str]]) -> tuple[int, str]:
    """(depth from the top, the part) of a module: its first component names its part."""
    head = module.split(".")[0]
    for depth, parts in enumerate(contract):
        if head in parts:
            return depth, head
    raise AssertionError(f"{module} belongs to no layer of the contract")


def check_contract(package: Path, contract: list[list[str]]) -> list[Violation]:
    """Every upward import, import between independent parts, and import cycle."""
    names = module_names(package)
    known = set(names)
    graph = {m: imports_of(m, p, known) for m, p in names.items() if m}
    violations = []
    for importer, imported_set in graph.items():
        depth, part = layer_of(importer, contract)
        for imported in sorted(imported_set):
            if imported == "":  # the package itself: only its version
                continue
            other_depth, other_part = layer_of(imported, contract)
            if other_depth < depth:
                violations.append(Violation(importer, imported, f"{other_part} is above {part}"))
            elif other_depth == depth and other_part != part:
                violations.append(
                    Violation(importer, imported, f"{part} and {other_part} are independent")
                )
    violations += [Violation(c[0], c[1], "cycle " + " -> ".join(c)) for c in cycles(graph)]
    return violations


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per import cycle found by a depth-first search."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_imports_point_down_the_documented_layers_with_no_cycle():
    contract = read_contract(ARCHITECTURE.read_text())
    violations = check_contract(PACKAGE, contract)
    assert not violations, "import contract broken:\n" + "\n".join(map(str, violations))


def test_every_module_is_in_the_documented_tree_and_nothing_else():
    text = ARCHITECTURE.read_text()
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", text, re.M))
    on_disk = {
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"
    }
    assert on_disk - listed == set(), (
        f"modules missing from docs/architecture.md: {on_disk - listed}"
    )
    assert listed - on_disk == set(), (
        f"docs/architecture.md lists modules that are gone: {listed - on_disk}"
    )


def test_every_subpackage_says_its_purpose_in_one_line():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "\n" not in doc.strip(), f"{init}: one-line purpose docstring expected"


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    package = tmp_path / NAME
    for rel, text in files.items():
        path = package / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


CONTRACT = [["cli"], ["run"], ["train"], ["core"]]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"core/a.py": "from safegrpo_pl.train.b import x\n", "train/b.py": "x = 1\n"}, "above"),
        ({"core/a.py": "def f():\n    import safegrpo_pl.run.b\n", "run/b.py": ""}, "above"),
        (
            {
                "core/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                "    from safegrpo_pl.core.b import y\n",
                "core/b.py": "from safegrpo_pl.core.a import z\n",
            },
            "cycle",
        ),
        (
            {
                "core/a.py": "import importlib\nimportlib.import_module('safegrpo_pl.cli')\n",
                "cli.py": "",
            },
            "above",
        ),
    ],
    ids=["upward", "lazy-upward", "type-checking-cycle", "by-name"],
)
def test_the_check_catches_a_planted_violation(tmp_path, files, expected):
    package = _plant(tmp_path, {"__init__.py": "", **files})
    violations = check_contract(package, CONTRACT)
    assert any(expected in v.why for v in violations), (
        f"planted {expected!r} not caught: {violations}"
    )


def test_the_check_passes_downward_imports(tmp_path):
    package = _plant(
        tmp_path,
        {"__init__.py": "", "core/a.py": "", "train/b.py": "from safegrpo_pl.core import a\n"},
    )
    assert check_contract(package, CONTRACT) == []
