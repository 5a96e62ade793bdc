"""The registry of adapter kinds; codecs look tensor names up here instead of knowing kinds."""

from __future__ import annotations

from .base import Kind
from .full import FullDiff
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA

KINDS: dict[str, Kind] = {k.name: k for k in (LoRA(), LoHa(), LoKr(), FullDiff())}


def suffix_table(scheme: str) -> dict[str, tuple[Kind, str]]:
    """suffix -> (kind, role) for one naming scheme, across every registered kind."""
    table: dict[str, tuple[Kind, str]] = {}
    for kind in KINDS.values():
        for suffix, role in kind.names.get(scheme, {}).items():
            table[suffix] = (kind, role)
    return table


__all__ = ["KINDS", "Kind", "suffix_table"]
