"""Writing planned units: one safetensors file, or a PEFT adapter dir built beside DEST and renamed
into place. Tensors whose bytes do not change are copied from the source, never re-encoded."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..adapter import Adapter, AdapterModule, Piece, non_finite
from ..archs import BaseArchitecture
from ..formats import Entry, Layout, Origin
from ..io.atomic import atomic_directory, atomic_write_text
from ..io.safetensors_file import DTYPES, bytes_are_finite
from ..io.source import PEFT_CONFIG
from ..io.writer import (
    HASH_KEY,
    LEGACY_HASH_KEY,
    LEGACY_HASH_SPAN,
    SafetensorsWriter,
    TensorSpec,
    encode_header,
)
from ..progress import Progress, Tally
from ..units import Load


def config_json(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def is_copy(adapter: Adapter | None, piece: Piece) -> bool:
    return (
        adapter is not None
        and piece.key is not None
        and not piece.transposed
        and adapter.source.info(piece.key).dtype == piece.dtype
    )


def write_output(
    layout: Layout,
    dest: str | os.PathLike,
    force: bool,
    adapter: Adapter | None,
    entries: list[Entry],
    metadata: dict[str, str],
    units: dict[str, AdapterModule],
    origin: Origin,
    arch: BaseArchitecture | None,
    progress: Progress | None,
) -> int:
    """The layout's output: one file, or a directory (the layout's weights file and its
    adapter_config.json: PEFT, mlx-lm) built beside DEST and renamed into place. Returns the bytes
    of tensor data written."""
    if layout.is_directory:
        with atomic_directory(dest, force) as tmp:
            written = write_entries(adapter, entries, metadata, tmp / layout.weights_name, progress)
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
            if is_copy(adapter, piece):
                ref = adapter.source.ref(piece.key)
                raw = ref.file.read_bytes(ref.name)
                if not bytes_are_finite(raw, ref.info.dtype):  # checked on the bytes: a renaming needs no torch
                    raise non_finite(adapter.source.path, piece.key)
                writer.write_raw(spec.name, raw, spec.dtype, spec.shape)
            else:
                tensor = load(piece).to(DTYPES[spec.dtype]).reshape(spec.shape).contiguous()
                writer.write(spec.name, tensor)
            tally.advance(spec.nbytes)
    return total
