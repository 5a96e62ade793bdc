"""torch, imported on first use rather than when a loratool module is imported.

Every loratool module takes `torch` from here. Reading headers, renaming keys, `--help` and shell
completion never touch it, so they never pay the second torch's import costs; the first attribute
looked up on it imports torch and copies its namespace in, so later look-ups are plain attribute
reads.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class _LazyTorch(ModuleType):
    def __getattr__(self, name: str) -> object:
        module = importlib.import_module("torch")
        self.__dict__.update(module.__dict__)
        return getattr(module, name)


torch = _LazyTorch("torch")
