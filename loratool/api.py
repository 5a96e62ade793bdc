"""The Python API users script against; the CLI is a thin shell over these functions.

`convert`, `merge`, `combine`, `extract` and `resize` are the implementations themselves, re-exported
here with the report types they return, so `import loratool` is all a script needs. docs/api.md
documents each one; every long-running call takes `progress=`, a callback given a `Step`.
"""

from __future__ import annotations

import os

from . import errors as errors
from .adapter import Adapter, AdapterModule
from .commands.combine import CombineReport, combine
from .commands.convert import ConvertReport, convert
from .commands.extract import ExtractReport, extract
from .commands.inspect import InspectReport, ModuleReport
from .commands.inspect import inspect as _inspect
from .commands.merge import MergeReport, merge
from .commands.resize import ResizeReport, resize
from .commands.scan import Scanned, inspect_each, is_library
from .errors import LoratoolError
from .formats import read_adapter
from .ops.findings import Finding
from .progress import Progress, Step
from .sizes import parse_size as parse_size


def inspect(
    path: str | os.PathLike,
    base: str | os.PathLike | None = None,
    progress: Progress | None = None,
    allow_pickle: bool = False,
    header_only: bool = False,
) -> InspectReport:
    """Describe a LoRA file or PEFT adapter directory and check it (optionally against its base).

    `header_only` reads no tensor values (the header and alpha scalars only): everything but the
    norms, value checks and hash check, fast enough to scan a library."""
    return _inspect(path, base=base, progress=progress, allow_pickle=allow_pickle, header_only=header_only)


def load_adapter(path: str | os.PathLike, allow_pickle: bool = False) -> Adapter:
    """Read a LoRA file or PEFT adapter dir into the canonical model; tensors load lazily.

    Close it (or use it as a context manager) to release the file. Pickle files (.pt, .ckpt,
    .bin) are refused unless `allow_pickle`; then only their tensors are loaded.
    """
    adapter, _ = read_adapter(path, allow_pickle=allow_pickle)
    return adapter


__all__ = [
    "Adapter",
    "AdapterModule",
    "CombineReport",
    "ConvertReport",
    "ExtractReport",
    "Finding",
    "InspectReport",
    "LoratoolError",
    "MergeReport",
    "ModuleReport",
    "Progress",
    "ResizeReport",
    "Scanned",
    "Step",
    "combine",
    "convert",
    "extract",
    "inspect",
    "inspect_each",
    "is_library",
    "load_adapter",
    "merge",
    "resize",
]
