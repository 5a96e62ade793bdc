"""loratool: inspect, convert, merge and extract LoRA adapters with bounded memory.

The public API (loratool.api, listed in `__all__`) is loaded on first use, so `import loratool`
and the command line's help and completion do not pay for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

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
    "__version__",
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

if TYPE_CHECKING:
    from .api import (
        Adapter,
        AdapterModule,
        CombineReport,
        ConvertReport,
        ExtractReport,
        Finding,
        InspectReport,
        LoratoolError,
        MergeReport,
        ModuleReport,
        Progress,
        ResizeReport,
        Scanned,
        Step,
        combine,
        convert,
        extract,
        inspect,
        inspect_each,
        is_library,
        load_adapter,
        merge,
        resize,
    )


def __getattr__(name: str) -> object:
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'loratool' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
