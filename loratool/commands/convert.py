"""convert: any layout we read -> kohya, diffusers or PEFT, with every module's update unchanged.

The walk: read the adapter (header only) -> plan the output units (split/fuse where the target
names fused weights differently) -> refuse anything the target cannot hold -> stream the tensors
out one module at a time, copying unchanged tensors byte for byte -> rename into place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..adapter import Adapter, AdapterModule
from ..archs import hint_matches
from ..errors import ConversionError
from ..formats import LAYOUTS, Layout, read_adapter
from ..io.destination import check_destination
from ..output.planning import extra_entries, ignored_notes, plan_units, refuse_lossy_input
from ..output.write import is_copy, write_output
from ..progress import Progress


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
    check_destination([Path(src)], Path(dest), force, directory=layout.is_directory)
    adapter, detection = read_adapter(src, arch, allow_pickle)
    with adapter:
        refuse_lossy_input(adapter, detection)
        named, notes = plan_units(adapter, layout)
        notes += ignored_notes(adapter)
        if adapter.arch_tied and arch is None:
            _check_ambiguity(src, adapter, layout, named, allow_pickle)
        entries = [e for name, unit in named.items() for e in layout.entries(name, unit, adapter.arch)]
        entries += extra_entries(adapter, layout)
        metadata = layout.metadata(named, adapter, adapter.arch)
        version = adapter.arch.base_model_version if adapter.arch is not None else None
        certain = version is not None and (arch or not adapter.arch_tied)
        if certain and not hint_matches(adapter.arch, metadata):  # so the next reader need not guess
            metadata.setdefault("ss_base_model_version", version)
        written = write_output(layout, dest, force, adapter, entries, metadata, named, adapter, adapter.arch, progress)
    copied = sum(1 for e in entries if is_copy(adapter, e.piece))
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


def _check_ambiguity(
    src: str | os.PathLike, adapter: Adapter, layout: Layout, named: dict[str, AdapterModule], allow_pickle: bool
) -> None:
    """Names that fit several architectures are fine when every reading converts the same way."""
    mine = _signature(layout, adapter, named)
    for other in adapter.arch_tied:
        if other == adapter.arch.name:
            continue
        alt, _ = read_adapter(src, other, allow_pickle)
        with alt:
            try:
                alt_named, _ = plan_units(alt, layout)
            except ConversionError:
                continue  # that reading cannot be converted at all, so it is not a rival
            if _signature(layout, alt, alt_named) != mine:
                raise ConversionError(
                    f"{src}: its module names fit {adapter.arch.name} and {other} equally, and the two convert "
                    f"differently; pass --arch {adapter.arch.name} or --arch {other}"
                )


def _signature(layout: Layout, adapter: Adapter, named: dict[str, AdapterModule]) -> list[tuple[str, tuple[int, ...]]]:
    return [(e.key, e.piece.shape) for n, u in named.items() for e in layout.entries(n, u, adapter.arch)]
