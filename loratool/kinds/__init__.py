"""The registry of adapter kinds; codecs look tensor names up here instead of knowing kinds."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from types import MappingProxyType

from .adalora import AdaLoRA
from .base import Kind
from .boft import BOFT
from .full import FullDiff
from .glora import GLoRA
from .ia3 import IA3
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .norm import NormDiff
from .oft import DiagOFT
from .peft_boft import PeftBOFT
from .peft_ia3 import PeftIA3
from .peft_oft import PeftOFT
from .set_weight import SetWeight
from .vera import VeRA

KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        LoRA(),
        LoHa(),
        LoKr(),
        FullDiff(),
        NormDiff(),
        IA3(),
        GLoRA(),
        SetWeight(),
        PeftIA3(),
        AdaLoRA(),
        VeRA(),
        DiagOFT(),
        BOFT(),
        PeftOFT(),
        PeftBOFT(),
    )
}


@cache
def suffix_table(scheme: str) -> Mapping[str, tuple[Kind, str]]:
    """suffix -> (kind, role) for one naming scheme, across every registered kind (one shared,
    read-only table per scheme)."""
    table: dict[str, tuple[Kind, str]] = {}
    for kind in KINDS.values():
        for suffix, role in kind.names.get(scheme, {}).items():
            table[suffix] = (kind, role)
    return MappingProxyType(table)


@cache
def _companions() -> dict[str, str]:
    return {s: c for kind in KINDS.values() for s, c in kind.companions.items()}


def without_lone_generics(claimed: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """Claimed keys (key -> (module, suffix)) less those whose suffix is too generic to stand alone
    (IA3's `weight`) in a module that lacks the companion tensor saying what it is."""
    companions = _companions()
    present = {(module, suffix) for module, suffix in claimed.values()}
    return {
        key: (module, suffix)
        for key, (module, suffix) in claimed.items()
        if suffix not in companions or (module, companions[suffix]) in present
    }


__all__ = ["KINDS", "Kind", "suffix_table", "without_lone_generics"]
