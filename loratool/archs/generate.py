"""Regenerate `loratool/archs/tables/*.json` from the reference implementations.

    python -m loratool.archs.generate

Every module of `loratool.archs.families` whose name does not start with `_` is one family and
exposes `FAMILY`, or `VARIANTS` when the family's models differ in width, depth or modules (SD3
Medium, SD3.5 Medium and Large): one table each, named after the module (`sd3`, `sd3.5-large`). The
families are found by listing that package, so adding one is adding a module.
Each family's models are built on the meta device from their published configs (no weights, no
downloads) with diffusers and transformers, and every Linear, Conv and Embedding module becomes one
table row, as does every normalization layer with a learned weight (type and target "norm", which
LyCORIS's norm algorithm trains). The row also records the module's name in the original single-file
layout (LDM/sgm, OpenCLIP, BFL), which the family module derives from the block structure;
`tests/test_archs.py` checks those names against diffusers' own single-file converters. Each table
records its family's `order`, by which loratool sorts the tables it finds. diffusers and
transformers are needed only here and in tests, never at run time.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from dataclasses import replace
from pathlib import Path

from . import catalog
from . import families as families_package
from .catalog import CATALOG
from .families._build import TableFamily
from .table import Architecture

TABLES = Path(__file__).with_name("tables")


def families() -> list[TableFamily]:
    """Every family module's `FAMILY` (or its `VARIANTS`), in declared order (importing them builds
    no model)."""
    found = []
    for info in pkgutil.iter_modules(families_package.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{families_package.__name__}.{info.name}")
        declared = getattr(module, "VARIANTS", None) or (module.FAMILY,)
        for family in declared:
            if family.name != info.name and not (len(declared) > 1 and family.name.startswith(info.name)):
                raise ValueError(
                    f"families/{info.name}.py declares the family {family.name!r}: name it after the module"
                )
            found.append(replace(family, family=info.name))
    found.sort(key=lambda f: f.order)
    orders = [f.order for f in found]
    if len(set(orders)) != len(orders):
        raise ValueError(f"two families share an order: {[(f.name, f.order) for f in found]}")
    return found


def build_table(family: TableFamily, sources: dict[str, str]) -> dict:
    components, modules, fused = [], [], []
    for info, rows, groups in family.components():
        components.append(info)
        modules.extend(rows)
        fused.extend(groups.values())
    return {
        "arch": family.name,
        "title": family.title,
        "family": family.family or family.name,
        "order": family.order,
        "generated_by": "python -m loratool.archs.generate",
        "sources": sources,
        "hints": family.hints,
        "kohya_network_module": family.kohya_network_module,
        "widens": {module: {str(w): m for w, m in models.items()} for module, models in family.widens.items()},
        **({"yields_to": list(family.yields_to)} if family.yields_to else {}),
        "components": components,
        "fused": fused,
        "modules": modules,
    }


def build_tables() -> dict[str, dict]:
    """Every family's table, by name, in order."""
    import diffusers
    import transformers

    sources = {"diffusers": diffusers.__version__, "transformers": transformers.__version__}
    return {family.name: build_table(family, sources) for family in families()}


def dump(table: dict) -> str:
    """One module per line: small diffs when a library renames something."""
    lines = ["{"]
    items = list(table.items())
    for i, (key, value) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        if isinstance(value, list) and value and isinstance(value[0], dict):
            body = ",\n".join("  " + json.dumps(v, separators=(",", ":")) for v in value)
            lines.append(f"{json.dumps(key)}: [\n{body}\n]{comma}")
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main() -> None:
    TABLES.mkdir(exist_ok=True)
    for arch, table in build_tables().items():
        path = TABLES / f"{arch}.json"
        path.write_text(dump(table), encoding="utf-8")
        print(f"{path}: {len(table['modules'])} modules, {len(table['fused'])} fused weights")
    CATALOG.write_text(catalog.dump(catalog.build(committed_tables())), encoding="utf-8")
    print(f"{CATALOG}: every table's hints, components and module names")


def committed_tables() -> list[Architecture]:
    """Every table under `tables/`, in the order their families declare."""
    return sorted((Architecture.load(path) for path in TABLES.glob("*.json")), key=lambda a: (a.order, a.name))


if __name__ == "__main__":
    main()
