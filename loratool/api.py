"""The Python API users script against; the CLI is a thin shell over these functions.

`convert`, `merge`, `combine`, `extract` and `resize` are the implementations themselves, re-exported here.
"""

from __future__ import annotations

import os

from .adapter import Adapter
from .conversion import convert
from .conversion.combine import combine
from .extraction import extract
from .extraction.resize import resize
from .formats import read_adapter
from .inspection import InspectReport, Progress
from .inspection import inspect as _inspect
from .merging import merge


def inspect(
    path: str | os.PathLike,
    base: str | os.PathLike | None = None,
    progress: Progress | None = None,
    allow_pickle: bool = False,
) -> InspectReport:
    """Describe a LoRA file or PEFT adapter directory and check it (optionally against its base)."""
    return _inspect(path, base=base, progress=progress, allow_pickle=allow_pickle)


def load_adapter(path: str | os.PathLike, allow_pickle: bool = False) -> Adapter:
    """Read a LoRA file or PEFT adapter dir into the canonical model; tensors load lazily.

    Close it (or use it as a context manager) to release the file. Pickle files (.pt, .ckpt,
    .bin) are refused unless `allow_pickle`; then only their tensors are loaded.
    """
    adapter, _ = read_adapter(path, allow_pickle=allow_pickle)
    return adapter


__all__ = ["combine", "convert", "extract", "inspect", "load_adapter", "merge", "resize"]
