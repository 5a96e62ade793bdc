"""The Python API users script against; the CLI is a thin shell over these functions."""

from __future__ import annotations

import os

from .adapter import Adapter
from .conversion import ConvertReport
from .conversion import convert as _convert
from .formats import read_adapter
from .inspection import InspectReport, Progress
from .inspection import inspect as _inspect


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


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read a LoRA file or PEFT adapter dir into the canonical model; tensors load lazily.

    Close it (or use it as a context manager) to release the file.
    """
    adapter, _ = read_adapter(path)
    return adapter
