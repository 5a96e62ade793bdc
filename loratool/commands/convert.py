"""convert: any layout we read -> kohya, diffusers or PEFT, with every module's update unchanged.

The walk: read the adapter (header only) -> plan the output units (split/fuse where the target
names fused weights differently) -> refuse anything the target cannot hold -> stream the tensors
out one module at a time, copying unchanged tensors byte for byte -> rename into place.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..adapter import Adapter, refuse_non_finite
from ..archs import Architecture, HFArchitecture, hint_matches
from ..errors import ConversionError
from ..formats import read_adapter
from ..formats.detect import Detection
from ..io.destination import check_destination
from ..io.safetensors_file import DTYPES, tensor_from_bytes
from ..io.source import PEFT_CONFIG, PEFT_WEIGHTS
from ..io.writer import (
    HASH_KEY,
    LEGACY_HASH_KEY,
    LEGACY_HASH_SPAN,
    SafetensorsWriter,
    TensorSpec,
    atomic_directory,
    atomic_write_text,
    encode_header,
)
from ..ops.fuse import swap_halves
from ..progress import Progress, Tally
from .layouts import LAYOUTS, Entry, Layout, Origin, PeftLayout
from .plan import Load, Piece, Unit, fuse_group, split, unit_of


@dataclass
class ConvertReport:
    source: str
    dest: str
    source_format: str
    target: str
    architecture: str | None
    modules_in: int
    modules_out: int
    tensors_copied: int  # written from the source's bytes unchanged
    tensors_computed: int  # sliced, stacked, reshaped across dtypes, or new alphas
    bytes_written: int
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def convert(
    src: str | os.PathLike,
    to: str,
    dest: str | os.PathLike,
    *,
    arch: str | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
) -> ConvertReport:
    """Write a LoRA in another layout (`kohya`, `diffusers` or `peft`) with every module's update unchanged.

    Raises `ConversionError` (naming the module) when the target cannot hold something; nothing
    is written then.
    """
    layout = LAYOUTS[to]
    check_destination([Path(src)], Path(dest), force, directory=isinstance(layout, PeftLayout))
    adapter, detection = read_adapter(src, arch, allow_pickle)
    with adapter:
        refuse_lossy_input(adapter, detection)
        named, notes = plan(adapter, layout)
        notes += ignored_notes(adapter)
        if adapter.arch_tied and arch is None:
            _check_ambiguity(src, adapter, layout, named, allow_pickle)
        entries = [e for name, unit in named.items() for e in layout.entries(name, unit, adapter.arch)]
        entries += extra_entries(adapter, layout)
        metadata = layout.metadata(named, adapter, adapter.arch)
        certain = isinstance(adapter.arch, Architecture) and (arch or not adapter.arch_tied)
        if certain and not hint_matches(adapter.arch, metadata):  # so the next reader need not guess
            metadata.setdefault("ss_base_model_version", adapter.arch.hints["ss_base_model_version"][0])
        written = write_output(layout, dest, force, adapter, entries, metadata, named, adapter, adapter.arch, progress)
    copied = sum(1 for e in entries if _is_copy(adapter, e.piece))
    return ConvertReport(
        source=str(src),
        dest=str(dest),
        source_format=adapter.format,
        target=layout.name,
        architecture=getattr(adapter.arch, "name", None),
        modules_in=len(adapter.modules),
        modules_out=len(named),
        tensors_copied=copied,
        tensors_computed=len(entries) - copied,
        bytes_written=written,
        notes=notes,
    )


def config_json(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def refuse_lossy_input(adapter: Adapter, detection: Detection) -> None:
    """Convert never drops anything silently: tensors it cannot account for stop it."""
    if detection.unexplained:
        n = len(detection.unexplained)
        raise ConversionError(
            f"{adapter.source.path}: {n} tensor(s) no layout explains (e.g. {detection.unexplained[0]!r}); "
            "converting would drop them"
        )
    for orphan in adapter.orphans:
        if orphan.severity == "error" or not orphan.key.endswith("alpha"):
            raise ConversionError(f"{orphan.module}: {orphan.reason}")
    for module in adapter.modules.values():
        if module.problem:
            raise ConversionError(f"{module.name}: {module.problem}")


def ignored_notes(adapter: Adapter) -> list[str]:
    """What is left out, said out loud: alphas of modules that have no factors change nothing."""
    return [f"{o.key}: {o.reason}, not written" for o in adapter.orphans]


def plan(adapter: Adapter, layout: Layout) -> tuple[dict[str, Unit], list[str]]:
    """Output units by name, and notes on every split, fuse and dropped zero part."""
    arch = adapter.arch
    if arch is None:
        raise ConversionError(
            f"{adapter.source.path}: unknown architecture ({adapter.arch_reason}); {layout.name} names "
            "depend on it (pass --arch if you know it)"
        )
    units = []
    for module in adapter.modules.values():
        if not module.targets:
            raise ConversionError(f"{module.name}: not a module of {arch.name} ({arch.title}); cannot name it")
        units.append(unit_of(module, adapter))
    notes: list[str] = []
    load = Load(adapter)
    for unit in units:
        why = layout.why_not(unit)
        if why:
            raise ConversionError(f"{unit.origin}: cannot write as {layout.name}: {why}")
    if isinstance(arch, Architecture):
        components = sorted({u.component for u in units})
        if layout.single_component and len(components) > 1:
            other = "diffusers" if all(u.kind.name == "lora" for u in units) else "kohya"
            raise ConversionError(
                f"{adapter.source.path}: a PEFT adapter dir wraps one model, and this LoRA adapts "
                f"{', '.join(components)}; use --to {other} for a multi-model file"
            )
        units = _regroup(arch, units, layout, load, notes)
    named: dict[str, Unit] = {}
    for unit in units:
        name = layout.unit_name(arch, unit.targets)
        if name in named:
            raise ConversionError(f"{named[name].origin} and {unit.origin} both update {name}; merge them first")
        why = layout.why_not(unit)
        if why:
            raise ConversionError(f"{unit.origin}: cannot write as {layout.name}: {why}")
        unit = layout.prepare(unit, load)
        named[name] = _row_order(arch, layout, unit, load)
        notes.extend(unit.notes)
    layout.check_together(named, arch)
    return named, notes


def _regroup(arch: Architecture, units: list[Unit], layout: Layout, load: Load, notes: list[str]) -> list[Unit]:
    """Split fused modules the layout names part by part; fuse parts it names only as a whole."""
    final: list[Unit] = []
    pending: dict[str, dict[str, Unit]] = {}
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
            group = arch.fused.get(arch.modules[target].fused or "")
            if group is None or layout.unit_name(arch, group.parts) is None:
                raise ConversionError(f"{unit.origin}: {layout.name} has no name for {target}")
            slot = pending.setdefault(group.name, {})
            if target in slot:
                raise ConversionError(f"{slot[target].origin} and {part.origin} both update {target}; merge them first")
            slot[target] = part
    final.extend(fuse_group(arch.fused[name], parts, load) for name, parts in pending.items())
    return final


def _row_order(arch: Architecture | HFArchitecture, layout: Layout, unit: Unit, load: Load) -> Unit:
    """Flux's final modulation rows are (shift, scale) in BFL files and (scale, shift) in diffusers."""
    if not isinstance(arch, Architecture) or len(unit.targets) != 1:
        return unit
    if arch.modules[unit.targets[0]].rows != "swap_halves":
        return unit
    native = layout.native_rows(arch, unit.targets)
    if native == unit.native_rows:
        return unit
    pieces = dict(unit.pieces)
    for role in ("up", "bias", "dora"):
        piece = pieces.get(role)
        if piece is not None:
            pieces[role] = Piece(piece.dtype, piece.shape, None, lambda p=piece: swap_halves(load(p)))
    return replace(unit, pieces=pieces, native_rows=native, notes=[*unit.notes, f"{unit.origin}: row halves swapped"])


def _check_ambiguity(
    src: str | os.PathLike, adapter: Adapter, layout: Layout, named: dict[str, Unit], allow_pickle: bool
) -> None:
    """Names that fit several architectures are fine when every reading converts the same way."""
    mine = _signature(layout, adapter, named)
    for other in adapter.arch_tied:
        if other == adapter.arch.name:
            continue
        alt, _ = read_adapter(src, other, allow_pickle)
        with alt:
            try:
                alt_named, _ = plan(alt, layout)
            except ConversionError:
                continue  # that reading cannot be converted at all, so it is not a rival
            if _signature(layout, alt, alt_named) != mine:
                raise ConversionError(
                    f"{src}: its module names fit {adapter.arch.name} and {other} equally, and the two convert "
                    f"differently; pass --arch {adapter.arch.name} or --arch {other}"
                )


def _signature(layout: Layout, adapter: Adapter, named: dict[str, Unit]) -> list[tuple[str, tuple[int, ...]]]:
    return [(e.key, e.piece.shape) for n, u in named.items() for e in layout.entries(n, u, adapter.arch)]


def extra_entries(adapter: Adapter, layout: Layout) -> list[Entry]:
    """Full tensors PEFT saves beside the adapter (modules_to_save, resized embeddings): only a
    layout with PEFT's own keys can carry them."""
    if not adapter.extra_keys:
        return []
    key, what = next(iter(adapter.extra_keys.items()))
    if not layout.carries_full_weights(adapter.arch):
        raise ConversionError(f"{key}: {what}; {layout.name} files have no place for it")
    out = []
    for key in adapter.extra_keys:
        info = adapter.source.info(key)
        out.append(Entry(key, Piece(info.dtype, info.shape, key)))
    return out


def _is_copy(adapter: Adapter | None, piece: Piece) -> bool:
    return adapter is not None and piece.key is not None and adapter.source.info(piece.key).dtype == piece.dtype


def write_output(
    layout: Layout,
    dest: str | os.PathLike,
    force: bool,
    adapter: Adapter | None,
    entries: list[Entry],
    metadata: dict[str, str],
    units: dict[str, Unit],
    origin: Origin,
    arch: Architecture | HFArchitecture | None,
    progress: Progress | None,
) -> int:
    """The layout's output: one file, or a PEFT dir (weights and adapter_config.json) built beside
    DEST and renamed into place. Returns the bytes of tensor data written."""
    if isinstance(layout, PeftLayout):
        with atomic_directory(dest, force) as tmp:
            written = write_entries(adapter, entries, metadata, tmp / PEFT_WEIGHTS, progress)
            atomic_write_text(tmp / PEFT_CONFIG, config_json(layout.config(units, origin, arch)))
        return written
    return write_entries(adapter, entries, metadata, Path(dest), progress)


def write_entries(
    adapter: Adapter | None, entries: list[Entry], metadata: dict[str, str], path: Path, progress: Progress | None
) -> int:
    """Stream `entries` into one safetensors file; pieces that name a tensor of `adapter` (when
    given) are copied byte for byte, the rest computed."""
    specs = [TensorSpec(e.key, e.piece.dtype, e.piece.shape) for e in entries]
    record_hash = HASH_KEY in metadata
    legacy = LEGACY_HASH_KEY in metadata
    if legacy and 8 + len(encode_header(specs, metadata)) + 64 > LEGACY_HASH_SPAN[0]:
        metadata = {k: v for k, v in metadata.items() if k != LEGACY_HASH_KEY}
        legacy = False
    total = sum(s.nbytes for s in specs)
    tally = Tally(progress, len(specs), total)
    load = Load(adapter)
    with SafetensorsWriter(path, specs, metadata, record_hash=record_hash, record_legacy_hash=legacy) as writer:
        for entry, spec in zip(entries, specs, strict=True):
            piece = entry.piece
            if _is_copy(adapter, piece):
                ref = adapter.source.ref(piece.key)
                raw = ref.file.read_bytes(ref.name)
                refuse_non_finite(tensor_from_bytes(raw, ref.info), adapter.source.path, piece.key)
                writer.write_raw(spec.name, raw, spec.dtype, spec.shape)
            else:
                tensor = load(piece).to(DTYPES[spec.dtype]).reshape(spec.shape).contiguous()
                writer.write(spec.name, tensor)
            tally.advance(spec.nbytes)
    return total
