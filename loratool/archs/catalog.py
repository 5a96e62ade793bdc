"""What is asked of every table at once, kept in one small generated file: each table's hints and
components, and which tables know each module name in each naming scheme.

Detection weighs a file's module names against every table, and several readers ask whether any
table knows a name or a component. Loading and indexing all the tables to answer costs a third of
a second per process, more than reading hundreds of LoRA headers; with the catalog, only the
tables a file's names point at are loaded. `python -m loratool.archs.generate` writes it from the
tables; `tests/test_archs.py` checks it against them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

from .table import Architecture

CATALOG = Path(__file__).with_name("catalog.json")
SCHEMES = ("kohya", "diffusers", "native")  # the naming schemes of Architecture.index


@dataclass(frozen=True)
class TableEntry:
    """One table as the catalog lists it."""

    name: str
    title: str
    hints: dict[str, list[str]]
    components: tuple[str, ...]


@dataclass(frozen=True)
class Catalog:
    tables: tuple[TableEntry, ...]  # in the tables' order (family order, then name): detection's tie order
    owners: dict[str, dict[str, tuple[str, ...]]]  # scheme -> module name -> the tables that know it, in order

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tables)

    @cached_property
    def components(self) -> frozenset[str]:
        """Every diffusers component name any table has."""
        return frozenset(c for t in self.tables for c in t.components)

    @cached_property
    def native_names(self) -> frozenset[str]:
        """Every single-file module name any table knows (with its LoRA prefixes)."""
        return frozenset(self.owners["native"])

    @cached_property
    def native_only_names(self) -> frozenset[str]:
        """Single-file module names some table reads under a component's name (HunyuanVideo's
        `transformer.double_blocks.0.img_attn_qkv`, which ComfyUI also loads) and no table has as a
        diffusers path: those keys are the native layout's, not diffusers'."""
        return frozenset(self.owners["native"].keys() - self.owners["diffusers"].keys())

    @cached_property
    def unprefixed_paths(self) -> dict[str, str]:
        """Module path -> the component it belongs to, for paths only one component of any table
        has (a UNet's `down_blocks...` and a text encoder's `text_model...` never meet)."""
        owners: dict[str, set[str]] = {}
        for name in self.owners["diffusers"]:
            component, _, path = name.partition(".")
            owners.setdefault(path, set()).add(component)
        return {path: next(iter(c)) for path, c in owners.items() if len(c) == 1}


def build(tables: Iterable[Architecture]) -> dict:
    """The catalog of `tables` (given in their order) as the JSON document it is stored as: the
    names grouped by the tables that know them, which keeps the file small."""
    tables = list(tables)
    document: dict = {
        "generated_by": "python -m loratool.archs.generate",
        "tables": [
            {"name": a.name, "title": a.title, "hints": a.hints, "components": list(a.components)} for a in tables
        ],
        "names": {},
    }
    for scheme in SCHEMES:
        groups: dict[tuple[str, ...], list[str]] = {}
        owners: dict[str, list[str]] = {}
        for arch in tables:
            for name in arch.index(scheme):
                owners.setdefault(name, []).append(arch.name)
        for name, owned in owners.items():
            groups.setdefault(tuple(owned), []).append(name)
        document["names"][scheme] = [[list(owned), sorted(names)] for owned, names in sorted(groups.items())]
    return document


def dump(document: dict) -> str:
    """One table, or one group of names, per line."""
    lines = ["{", f'"generated_by": {json.dumps(document["generated_by"])},', '"tables": [']
    lines.append(",\n".join(json.dumps(t, separators=(",", ":")) for t in document["tables"]))
    lines.append("],")
    lines.append('"names": {')
    schemes = []
    for scheme, groups in document["names"].items():
        body = ",\n".join(json.dumps(g, separators=(",", ":")) for g in groups)
        schemes.append(f"{json.dumps(scheme)}: [\n{body}\n]")
    lines.append(",\n".join(schemes))
    lines.append("}")
    lines.append("}")
    return "\n".join(lines) + "\n"


@cache
def get_catalog() -> Catalog:
    document = json.loads(CATALOG.read_text(encoding="utf-8"))
    tables = tuple(TableEntry(t["name"], t["title"], t["hints"], tuple(t["components"])) for t in document["tables"])
    owners: dict[str, dict[str, tuple[str, ...]]] = {}
    for scheme, groups in document["names"].items():
        known = owners[scheme] = {}
        for owned, names in groups:
            known.update(dict.fromkeys(names, tuple(owned)))
    return Catalog(tables, owners)
