"""Which model a LoRA belongs to, and where each of its modules lives.

`get_architecture` loads one generated table when it is first asked for, `architectures()` all of
them in the order their families declare. `detect` picks the architecture whose table explains
most of a file's module names, unless its full-size widths disagree with most of those modules
(fit.py), breaking ties with metadata and then with factor shapes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

from .base import BaseArchitecture
from .catalog import TableEntry, get_catalog
from .fit import Pairs, TableFit, same_proportions, same_shape, same_type, shape_pairs, table_fit
from .hf import HFArchitecture, detect_hf
from .table import TABLES, Architecture, Component, FusedSpec, ModuleSpec, Targets, kohya_flat

__all__ = [
    "NO_FIT",
    "NO_NAMES",
    "ArchDetection",
    "Architecture",
    "BaseArchitecture",
    "Component",
    "FusedSpec",
    "HFArchitecture",
    "ModuleSpec",
    "Targets",
    "architectures",
    "detect",
    "get_architecture",
    "hint_matches",
    "kohya_flat",
]


NO_NAMES = "no known architecture has these module names"
NO_FIT = "no known architecture fits both names and shapes"


@cache
def architectures() -> dict[str, Architecture]:
    """Every table under `tables/`, sorted by the `order` its family declares: detection breaks ties
    by this order, so it is part of the behaviour. No list to edit when a family is added (the
    catalog lists them in that order)."""
    return {name: get_architecture(name) for name in get_catalog().names}


@cache
def get_architecture(name: str) -> Architecture:
    """One table, loaded on first use (most files need one or two of them)."""
    if name not in get_catalog().names:
        raise KeyError(name)
    return Architecture.load(TABLES / f"{name}.json")


@dataclass
class ArchDetection:
    arch: Architecture | HFArchitecture | None
    resolved: dict[str, Targets]  # file module name -> canonical targets (only names the arch knows)
    scores: list[tuple[str, int]] = field(default_factory=list)  # (arch name, names explained), best first
    reason: str = ""
    tied: list[str] = field(default_factory=list)  # architectures the names could not tell apart
    # module name -> (the factors' shape, the table's) where they disagree (full-size files only)
    misfits: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)


def hint_matches(arch: Architecture | TableEntry, metadata: dict[str, str]) -> bool:
    return hint_length(arch, metadata) > 0


def hint_length(arch: Architecture | TableEntry, metadata: dict[str, str]) -> int:
    """How much of the metadata names this architecture: the longest of its prefixes a value starts
    with (0 for none), so `qwen_image_2.1` names Qwen-Image 2.1 rather than Qwen-Image."""
    return max(
        (len(p) for key, prefixes in arch.hints.items() for p in prefixes if metadata.get(key, "").startswith(p)),
        default=0,
    )


def _best_fit(
    tied: list[tuple[Architecture, dict[str, Targets]]], pairs: dict[str, Pairs]
) -> tuple[list[tuple[Architecture, dict[str, Targets]]], str]:
    """Break a tie of names with the factors: first the kind of layer each module is, then the ratio
    of its widths, then the full-size shapes, each step keeping only the architectures that fit
    best; what still ties is reported as ambiguous. `pairs`: per architecture, each module's
    factors' and table's shape."""
    steps = (
        (same_type, ", layer types match"),
        (same_proportions, ", width ratios match"),
        (same_shape, ", full-size shapes match"),
    )

    def score(fits: Callable, arch: Architecture) -> int:
        return sum(1 for _, implied, full in pairs[arch.name] if fits(implied, full))

    for fits, why in steps:
        scores = [(score(fits, a), a, r) for a, r in tied]
        best = max(s for s, _, _ in scores)
        tied = [(a, r) for s, a, r in scores if s == best]
        if len(tied) == 1:
            if fits is same_proportions and score(steps[-1][0], tied[0][0]) == best:
                why = steps[-1][1]  # the ratios decided, and the winner's shapes are its full-size ones too
            return tied, why
    return tied, f", ambiguous between {', '.join(a.name for a, _ in tied)} (names alone cannot tell)"


def _yield(
    tied: list[tuple[Architecture, dict[str, Targets]]], why: str
) -> tuple[list[tuple[Architecture, dict[str, Targets]]], str]:
    """Families that yield to a tied rival leave the tie (HunyuanVideo's blocks are Flux.1's, name
    for name and shape for shape: a LoRA nothing else tells apart is read as the common one)."""
    rivals = {a.name for a, _ in tied}
    yielded = [a.name for a, _ in tied if rivals & set(getattr(a, "yields_to", ()))]
    if not yielded or len(yielded) == len(tied):
        return tied, why
    tied = [(a, r) for a, r in tied if a.name not in yielded]
    kept = ", ".join(a.name for a, _ in tied)
    why = f", ambiguous between {kept} (names alone cannot tell)" if len(tied) > 1 else ""
    return tied, f"{why}; {', '.join(yielded)} fits as well and yields to {kept}"


def _counts(names: list[str], scheme: str) -> dict[str, int]:
    """How many of `names` each table knows (names that the same tables know counted together)."""
    counts = dict.fromkeys(get_catalog().names, 0)
    for owned, n in Counter(map(get_catalog().owners[scheme].get, names)).items():
        for arch_name in owned or ():
            counts[arch_name] += n
    return counts


def detect(
    names: list[str],
    scheme: str,
    metadata: dict[str, str],
    implied_shape: Callable[[str], tuple[int, ...] | None] = lambda name: None,
    hf_name_hint: str | None = None,
    only: str | None = None,
) -> ArchDetection:
    """Score every table on `names`, written in `scheme` (kohya, diffusers or native names).

    Of the tables that know the most names, those whose full-size widths disagree with most of
    the modules they name are out (SD3.5 Medium's 1536-wide blocks under Flux.1's names); none left
    is an unknown architecture, with the reasons. Ties (an SD1 and an SD2 UNet share every module
    name) go to the architecture the metadata names, then to the one whose full-size shapes match
    the factors, then to table order. `only` restricts the choice to one architecture (the user said
    which); its width misfits are still reported, per module.
    """
    counts = _counts(names, scheme)
    scores = sorted(((a, n) for a, n in counts.items() if only in (None, a)), key=lambda an: -an[1])
    best_count = scores[0][1]

    def resolved(arch: Architecture) -> dict[str, Targets]:
        index = arch.index(scheme)
        return {n: index[n] for n in names if n in index}

    if only is not None:
        reason = f"{best_count} of {len(names)} module names, architecture given"
        arch = get_architecture(only)
        found = resolved(arch)
        fit = table_fit(shape_pairs(arch, found, implied_shape))
        return ArchDetection(arch, found, scores, reason, misfits=fit.misfits)
    if best_count == 0:
        hf = detect_hf(names, name_hint=hf_name_hint) if scheme == "diffusers" else None
        if hf is not None:
            return ArchDetection(hf, {n: (n,) for n in names}, scores, f"HF {hf.name} module paths")
        return ArchDetection(None, {}, scores, NO_NAMES)
    # The tables that know the most names; those whose widths disagree with most of them are out.
    tied = [(get_architecture(a), resolved(get_architecture(a))) for a, n in scores if n == best_count]
    pairs: dict[str, Pairs] = {}

    def pairs_of(arch: Architecture, found: dict[str, Targets]) -> Pairs:
        if arch.name not in pairs:
            pairs[arch.name] = shape_pairs(arch, found, implied_shape)
        return pairs[arch.name]

    # A reduced model is one against every table (their widths are within a few times of each
    # other): judged once, against the first, so a test model's scan weighs no widths.
    lead = table_fit(pairs_of(*tied[0]))
    fits = {a.name: lead if lead.reduced else table_fit(pairs_of(a, r)) for a, r in tied}
    out = [a for a, _ in tied if fits[a.name].rejected]
    tied = [(a, r) for a, r in tied if not fits[a.name].rejected]
    if not tied:
        why = "; ".join(_rejection(a, fits[a.name], best_count, len(names)) for a in out[:3])
        return ArchDetection(None, {}, scores, f"{NO_FIT}: {why}")
    reason = f"{best_count} of {len(names)} module names"
    if len(tied) > 1:
        lengths = [hint_length(a, metadata) for a, _ in tied]
        by_hint = [ar for ar, n in zip(tied, lengths, strict=True) if n and n == max(lengths)]
        if len(by_hint) == 1:
            tied, reason = by_hint, reason + ", metadata names it"
        else:
            tied, why = _best_fit(tied, {a.name: pairs_of(a, r) for a, r in tied})
            tied, why = _yield(tied, why)
            reason += why
    if out:
        reason += f"; {', '.join(a.name for a in out)} {'has' if len(out) == 1 else 'have'} these names at other widths"
    arch, found = tied[0]
    tied_names = [a.name for a, _ in tied] if len(tied) > 1 else []
    return ArchDetection(arch, found, scores, reason, tied_names, fits[arch.name].misfits)


def _rejection(arch: Architecture, fit: TableFit, known: int, total: int) -> str:
    return (
        f"{arch.name} ({arch.title}) knows {known} of {total} module names, but {len(fit.misfits)} of the "
        f"{fit.checked} have other widths (e.g. {fit.example()})"
    )
