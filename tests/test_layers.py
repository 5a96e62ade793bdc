"""The shape of the code that docs/architecture.md promises, checked on the source itself: the CLI
imports only the API, the report and the plot modules (and its option data and failure handling);
each command is one module; helpers that were written twice exist once."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import loratool

PACKAGE = Path(loratool.__file__).parent
COMMANDS = ("inspect", "convert", "combine", "merge", "extract", "resize")


def _relative_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            found.add((node.module or "").split(".")[0] or ".")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("loratool"))
    return found


def _sources() -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py"))}


def test_cli_imports_only_the_api_the_report_the_plot_and_its_own_small_modules() -> None:
    assert _relative_imports(PACKAGE / "cli.py") <= {".", "api", "report", "plot", "options", "failures"}


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_is_one_module_the_api_exports(command: str) -> None:
    module = importlib.import_module(f"loratool.commands.{command}")
    walk = getattr(module, command)
    assert walk.__module__ == module.__name__
    assert getattr(loratool, command) is walk or getattr(loratool, command).__module__ == "loratool.api"


@pytest.mark.parametrize(
    ("what", "pattern"),
    [
        ("the common dtype of stacked pieces", r"^def _?common_dtype\("),
        ("the refusal of input no layout explains", r"tensor\(s\) no layout explains"),
    ],
)
def test_a_shared_helper_is_defined_once(what: str, pattern: str) -> None:
    places = [str(p.relative_to(PACKAGE)) for p, text in _sources().items() if re.search(pattern, text, re.M)]
    assert len(places) == 1, f"{what}: {places}"


def test_no_module_is_both_a_package_module_and_a_function_name() -> None:
    """`loratool.conversion.plan` was a submodule and a function at once; names say one thing."""
    for path in PACKAGE.rglob("__init__.py"):
        package = path.parent
        defined = {n.name for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.FunctionDef)}
        submodules = {p.stem for p in package.glob("*.py")} | {p.name for p in package.iterdir() if p.is_dir()}
        assert not defined & submodules, f"{package.name}: {defined & submodules}"


def test_no_code_outside_archs_asks_which_kind_of_architecture_it_holds() -> None:
    """Tables and transformers families answer the same questions (archs/base.py)."""
    asking = re.compile(r"isinstance\([^)]*\b(Architecture|HFArchitecture|BaseArchitecture)\b")
    places = [
        f"{p.relative_to(PACKAGE)}:{text[: m.start()].count(chr(10)) + 1}"
        for p, text in _sources().items()
        if p.relative_to(PACKAGE).parts[0] != "archs"
        for m in asking.finditer(text)
    ]
    assert not places, places


def test_no_code_asks_which_layout_it_holds() -> None:
    """A layout says what it is (`is_directory`, `single_component`, ...); nobody tests its class."""
    asking = re.compile(r"isinstance\([^)]*Layout\b")
    places = [str(p.relative_to(PACKAGE)) for p, text in _sources().items() if asking.search(text)]
    assert not places, places


def test_row_order_is_one_rule() -> None:
    """Single-file and canonical row orders differ only for modules whose architecture says so
    (Flux's final modulation), and only between a native and a canonical order."""
    import torch

    from loratool.archs import get_architecture
    from loratool.ops.fuse import halves_differ, reorder_rows

    flux = get_architecture("flux1")
    assert flux.swaps_rows("transformer.norm_out.linear")
    assert not flux.swaps_rows("transformer.proj_out")
    assert [halves_differ(True, a, b) for a, b in ((True, False), (False, True), (True, True), (False, False))] == [
        True,
        True,
        False,
        False,
    ]
    assert not halves_differ(False, True, False)
    rows = torch.arange(6.0)[:, None]
    assert reorder_rows(rows, True, False, True)[:, 0].tolist() == [3.0, 4.0, 5.0, 0.0, 1.0, 2.0]
    assert torch.equal(reorder_rows(reorder_rows(rows, True, True, False), True, False, True), rows)
    assert reorder_rows(rows, False, False, True) is rows


# Small modules every layer may use: the exception family, progress callbacks, option parsers, the
# options' vocabulary and torch imported on first use.
UTILITIES = {"errors", "progress", "sizes", "strengths", "options", "lazy_torch"}


def _documented_layers() -> list[tuple[set[str], set[str]]]:
    """(layers, what they may import) per row of docs/architecture.md's layer table, top to bottom."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            names = {n.removesuffix(".py").rstrip("/") for n in re.findall(r"`([^`]+)`", cells[0])}
            may = re.sub(r"\([^)]*\)", "", cells[-1])  # asides name files, not layers
            rows.append((names, set(re.findall(r"`([^`]+)`", may))))
    return rows


def _layer_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0].removesuffix(".py")


def _imported_layers(path: Path) -> set[str]:
    """The layers of ours a module imports (imports within its own package excluded)."""
    inside = len(path.relative_to(PACKAGE).parts) > 1
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            if node.level == 1 and inside:
                continue
            found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("loratool."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("loratool."))
    return found - {"__version__"}


def test_imports_follow_the_documented_layer_table() -> None:
    """Each layer imports only what its row of the table says, and only layers below it: data flows
    down the list. The table documents the code, so a new import is a change to the docs too."""
    rows = _documented_layers()
    position = {name: i for i, (names, _) in enumerate(rows) for name in names}
    allowed = {name: may for names, may in rows for name in names}
    for name, may in allowed.items():
        upward = {m for m in may - UTILITIES if position.get(m, -1) <= position[name]}
        assert not upward, f"the table lets {name} import {upward}, which are not below it"
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = _layer_of(path)
        imported = _imported_layers(path) - UTILITIES - {layer}
        assert layer in allowed, f"{layer} is not in the layer table"
        if layer == "__init__":
            imported -= {"api"}
        stray = imported - allowed[layer]
        assert not stray, f"{path.relative_to(PACKAGE)} imports {sorted(stray)}, which its row does not list"


def test_one_module_record() -> None:
    """A module read from a file and a module planned for one are the same record: no second class
    holds a module's kind, targets and alpha (conversion's Unit once copied 13 fields one by one).
    Reports describe modules in words and numbers; they hold no `Kind`."""
    records = []
    for path, text in _sources().items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                fields = {
                    s.target.id: ast.unparse(s.annotation)
                    for s in node.body
                    if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
                }
                if fields.get("kind") == "Kind" and {"targets", "alpha"} <= fields.keys():
                    records.append(f"{path.relative_to(PACKAGE)}:{node.name}")
    assert records == ["adapter.py:AdapterModule"]
