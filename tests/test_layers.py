"""The shape of the code that docs/architecture.md promises, checked on the source itself: the CLI
imports only the API, the report and the plot modules; each command is one module; helpers that
were written twice exist once."""

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


def test_cli_imports_only_the_api_the_report_and_the_plot() -> None:
    assert _relative_imports(PACKAGE / "cli.py") <= {".", "api", "report", "plot"}


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
