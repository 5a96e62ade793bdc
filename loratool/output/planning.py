"""Output units for a target layout: every module of an adapter as the layout names it.

Fused modules the layout names part by part are split, parts it names only as a whole are fused,
row halves are put in the layout's order, and whatever the layout cannot hold stops the plan with
the module's name. convert and combine plan this way; extract and resize build their units directly.
"""

from __future__ import annotations

from dataclasses import replace

from ..adapter import Adapter, AdapterModule, Piece, refuse_unusable
from ..archs import BaseArchitecture
from ..errors import ConversionError
from ..formats import Detection, Entry, Layout
from ..ops.fuse import halves_differ, swap_halves
from ..units import ROW_ROLES, Load, fuse_group, split, unit_of


def ignored_notes(adapter: Adapter) -> list[str]:
    """What is left out, said out loud: alphas of modules that have no factors change nothing."""
    return [f"{o.key}: {o.reason}, not written" for o in adapter.orphans]


def plan_units(adapter: Adapter, layout: Layout) -> tuple[dict[str, AdapterModule], list[str]]:
    """Output units by name, and notes on every split, fuse and dropped zero part."""
    arch = adapter.arch
    if arch is None:
        raise ConversionError(
            f"{adapter.source.path}: unknown architecture ({adapter.arch_reason}); {layout.name} names "
            "depend on it (pass --arch if you know it)"
        )
    load = Load(adapter)
    units = []
    for module in adapter.modules.values():
        if not module.targets:
            raise ConversionError(f"{module.name}: not a module of {arch.name} ({arch.title}); cannot name it")
        units.append(layout.adopt(unit_of(module, load), load))
    notes: list[str] = []
    for unit in units:
        why = layout.why_not(unit)
        if why:
            raise ConversionError(f"{unit.name}: cannot write as {layout.name}: {why}")
    components = sorted({u.component for u in units if u.component is not None})
    if layout.single_component and len(components) > 1:
        other = "diffusers" if all(u.kind.name == "lora" for u in units) else "kohya"
        raise ConversionError(
            f"{adapter.source.path}: a PEFT adapter dir wraps one model, and this LoRA adapts "
            f"{', '.join(components)}; use --to {other} for a multi-model file"
        )
    units = _regroup(arch, units, layout, load, notes)
    named: dict[str, AdapterModule] = {}
    for unit in units:
        name = layout.unit_name(arch, unit.targets)
        if name in named:
            raise ConversionError(f"{named[name].name} and {unit.name} both update {name}; merge them first")
        why = layout.why_not(unit)
        if why:
            raise ConversionError(f"{unit.name}: cannot write as {layout.name}: {why}")
        unit = layout.prepare(unit, load)
        named[name] = _row_order(arch, layout, unit, load)
        notes.extend(unit.notes)
    layout.check_together(named, arch)
    return named, notes


def _regroup(
    arch: BaseArchitecture, units: list[AdapterModule], layout: Layout, load: Load, notes: list[str]
) -> list[AdapterModule]:
    """Split fused modules the layout names part by part; fuse parts it names only as a whole."""
    final: list[AdapterModule] = []
    pending: dict[str, dict[str, AdapterModule]] = {}
    for unit in units:
        if layout.unit_name(arch, unit.targets) is not None:
            final.append(unit)
            continue
        parts = split(arch, unit, load) if len(unit.targets) > 1 else [unit]
        for part in parts:
            if not part.pieces:
                notes.extend(part.notes)
                continue
            if layout.unit_name(arch, part.targets) is not None:
                final.append(part)
                continue
            target = part.targets[0]
            group = arch.fused_group_of(target)
            if group is None or layout.unit_name(arch, group.parts) is None:
                raise ConversionError(f"{unit.name}: {layout.name} has no name for {target}")
            slot = pending.setdefault(group.name, {})
            if target in slot:
                raise ConversionError(f"{slot[target].name} and {part.name} both update {target}; merge them first")
            slot[target] = part
    final.extend(fuse_group(arch.fused[name], parts, load) for name, parts in pending.items())
    return final


def _row_order(arch: BaseArchitecture, layout: Layout, unit: AdapterModule, load: Load) -> AdapterModule:
    """Flux's final modulation rows are (shift, scale) in BFL files and (scale, shift) in diffusers."""
    native = layout.native_rows(arch, unit.targets)
    swaps = len(unit.targets) == 1 and arch.swaps_rows(unit.targets[0])
    if not halves_differ(swaps, unit.native_rows, native):
        return unit
    pieces = dict(unit.pieces)
    for role in ("up", *ROW_ROLES):
        piece = pieces.get(role)
        if piece is not None:
            pieces[role] = Piece(piece.dtype, piece.shape, None, lambda p=piece: swap_halves(load(p)))
    return replace(unit, pieces=pieces, native_rows=native, notes=[*unit.notes, f"{unit.name}: row halves swapped"])


def extra_entries(adapter: Adapter, layout: Layout) -> list[Entry]:
    """What travels beside the modules: full tensors PEFT saves with the adapter (modules_to_save,
    resized embeddings), which only a layout with PEFT's own keys can carry, and textual-inversion
    tokens, which go where the layout keeps them (kohya's `bundle_emb`). Anything else is refused
    by name: nothing is dropped silently."""
    out = []
    for key, token in adapter.tokens.items():
        name = layout.token_key(token)
        if name is None:
            raise ConversionError(
                f"{key}: a textual-inversion token embedding; {layout.name} files have no place for it "
                "(--to kohya bundles it as bundle_emb)"
            )
        info = adapter.source.info(key)
        out.append(Entry(name, Piece(info.dtype, info.shape if len(info.shape) == 2 else (1, *info.shape), key)))
    if adapter.extra_keys:
        key, what = next(iter(adapter.extra_keys.items()))
        if not layout.carries_full_weights(adapter.arch):
            raise ConversionError(f"{key}: {what}; {layout.name} files have no place for it")
        for key in adapter.extra_keys:
            info = adapter.source.info(key)
            out.append(Entry(key, Piece(info.dtype, info.shape, key)))
    return out


def refuse_lossy_input(adapter: Adapter, detection: Detection) -> None:
    """Commands that write an adapter (convert, combine, resize) never drop part of one silently."""
    refuse_unusable(adapter, detection.unexplained, ConversionError, "converting would drop them", True)
