"""The Python API users script against; the CLI is a thin shell over these functions."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .adapter import Adapter
from .conversion import ConvertReport
from .conversion import convert as _convert
from .conversion.combine import CombineReport
from .conversion.combine import combine as _combine
from .formats import read_adapter
from .inspection import InspectReport, Progress
from .inspection import inspect as _inspect
from .merging import MergeReport
from .merging import merge as _merge


def inspect(
    path: str | os.PathLike, base: str | os.PathLike | None = None, progress: Progress | None = None
) -> InspectReport:
    """Describe a LoRA file or PEFT adapter directory and check it (optionally against its base)."""
    return _inspect(path, base=base, progress=progress)


def convert(
    src: str | os.PathLike,
    to: str,
    dest: str | os.PathLike,
    *,
    arch: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> ConvertReport:
    """Write a LoRA in another layout (`kohya`, `diffusers` or `peft`) with every module's update unchanged.

    Raises `ConversionError` (naming the module) when the target cannot hold something; nothing
    is written then.
    """
    return _convert(src, to, dest, arch=arch, force=force, progress=progress)


def merge(
    base: str | os.PathLike,
    loras: Sequence[str | os.PathLike],
    dest: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    device: str = "auto",
    dtype: str = "keep",
    allow_unmatched: bool = False,
    shard_size: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> MergeReport:
    """Write `base` with each LoRA merged in at its weight (default 1.0; negative subtracts).

    The output mirrors the base (a file or a model directory, same keys, order, dtypes and shards);
    `dtype` is keep, fp32, fp16 or bf16; `shard_size` (bytes) re-shards a directory base. Raises
    `MergeError` (naming the module) for a LoRA module the base lacks, unless `allow_unmatched`,
    and for a result that is not finite or does not fit the output dtype; nothing is written then.
    """
    return _merge(
        base,
        loras,
        dest,
        weights=weights,
        device=device,
        dtype=dtype,
        allow_unmatched=allow_unmatched,
        shard_size=shard_size,
        force=force,
        progress=progress,
    )


def combine(
    loras: Sequence[str | os.PathLike],
    dest: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    to: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> CombineReport:
    """Write one LoRA whose update is the weighted sum of the inputs' updates.

    Exact without `rank` (alpha rescaled to the summed rank); with `rank`, each module's sum cut
    to its best rank-`rank` approximation. `to` is the layout (default: the first LoRA's).
    """
    return _combine(loras, dest, weights=weights, rank=rank, to=to, force=force, progress=progress)


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read a LoRA file or PEFT adapter dir into the canonical model; tensors load lazily.

    Close it (or use it as a context manager) to release the file.
    """
    adapter, _ = read_adapter(path)
    return adapter
