"""PEFT LoHa and LoKr adapter configs that rebuild LyCORIS modules exactly.

PEFT does not read factor shapes from the file: it builds every layer's parameters from the model
and the config, then loads the tensors into them. So a LoHaConfig/LoKrConfig must make PEFT choose
the very shapes the file has: LoHa's Tucker cores follow `use_effective_conv2d`; LoKr's Kronecker
split follows `decompose_factor`, its factored w1 `decompose_both` and the rank, its factored w2 the
rank alone. Those are settings for the whole adapter, so they are searched for here, and a module
no setting can rebuild is named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..adapter import AdapterModule
from ..errors import ConversionError

# Fields these configs compute; anything else a source PEFT config had is kept.
LYCORIS_FIELDS = ("r", "alpha", "rank_pattern", "alpha_pattern", "use_effective_conv2d", "decompose_both")
LOKR_FIELDS = ("decompose_factor",)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """The Kronecker split (m, n) of `dimension` that PEFT and LyCORIS choose: `factor` x the rest
    when `factor` divides it, else the divisor pair with the smallest sum whose smaller side does
    not pass `factor` (-1: no limit), smaller side first."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        candidate = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        partner = dimension // candidate
        if candidate + partner > m + n or candidate > limit:
            break
        m, n = candidate, partner
    return (n, m) if m > n else (m, n)


@dataclass(frozen=True)
class _Kron:
    """One LoKr module's structure as stored."""

    path: str
    name: str  # the module's, for messages
    out_split: tuple[int, int]  # (w1 rows, w2 rows)
    in_split: tuple[int, int]  # (w1 cols, w2 input channels)
    w1_rank: int | None  # None: w1 stored whole
    w2_rank: int | None


def _kron(path: str, unit: AdapterModule, kernel: tuple[int, ...]) -> _Kron:
    """`kernel`: the layer's, for a conv whose factored w2 folds it into w2_b's columns."""
    s = unit.shapes
    w1 = s["w1"] if "w1" in s else (s["w1a"][0], s["w1b"][1])
    if "w2" in s:
        w2_out, w2_in = s["w2"][0], s["w2"][1]
    elif "t2" in s:
        w2_out, w2_in = s["w2a"][1], s["w2b"][1]
    else:
        w2_out, w2_in = s["w2a"][0], s["w2b"][1]
        if len(s["w2b"]) == 2 and math.prod(kernel) > 1:
            w2_in //= math.prod(kernel)
    return _Kron(
        path,
        unit.name,
        (w1[0], w2_out),
        (w1[1], w2_in),
        None if "w1" in s else s["w1b"][0],
        None if "w2" in s else s["w2b"][0],
    )


def _kron_rank(module: _Kron, decompose_both: bool) -> int | None:
    """The `r` under which PEFT rebuilds this module's factors, or None when no `r` does."""
    a, b = module.out_split
    c, d = module.in_split
    ranks = {r for r in (module.w1_rank, module.w2_rank) if r is not None}
    if len(ranks) > 1:
        return None
    # Both whole: the smallest r that keeps them whole.
    whole = max(1, math.ceil(max(b, d) / 2), math.ceil(max(a, c) / 2) if decompose_both else 1)
    r = ranks.pop() if ranks else whole
    w1_factored = decompose_both and r < max(a, c) / 2
    w2_factored = r < max(b, d) / 2
    if w1_factored != (module.w1_rank is not None) or w2_factored != (module.w2_rank is not None):
        return None
    return r


def _effective_conv(units: list[tuple[str, AdapterModule]], core: str) -> bool:
    """`use_effective_conv2d`: on when any module keeps a Tucker core; then every conv with a
    kernel must have one (PEFT never builds a core for 1x1 convs)."""
    with_core = [(p, u) for p, u in units if core in u.pieces]
    if not with_core:
        return False
    for _, unit in units:
        weight = unit.kind.weight_shape(unit.shapes)
        whole_w2 = "w2" in unit.pieces  # a whole LoKr w2 never gets a core
        if core not in unit.pieces and not whole_w2 and len(weight) > 2 and any(k > 1 for k in weight[2:]):
            raise ConversionError(
                f"{unit.name}: a conv without a Tucker core, while {with_core[0][1].name} has one; "
                "PEFT builds cores for all convs of an adapter or for none"
            )
    return True


def _lokr_settings(
    units: list[tuple[str, AdapterModule]], kernels: dict[str, tuple[int, ...]]
) -> tuple[int, bool, dict[str, int]]:
    """(decompose_factor, decompose_both, r per path) that rebuild every LoKr module."""
    modules = [_kron(path, unit, kernels.get(path, ())) for path, unit in units]
    factors = [-1, *sorted({n for m in modules for n in (*m.out_split, *m.in_split)})]
    conflict: str | None = None
    for factor in factors:
        split_ok = all(
            factorization(math.prod(m.out_split), factor) == m.out_split
            and factorization(math.prod(m.in_split), factor) == m.in_split
            for m in modules
        )
        if not split_ok:
            continue
        for decompose_both in (False, True):
            ranks = {m.path: _kron_rank(m, decompose_both) for m in modules}
            if all(r is not None for r in ranks.values()):
                return factor, decompose_both, ranks
        conflict = conflict or _conflict(modules)
    if conflict is not None:
        raise ConversionError(conflict)
    for m in modules:
        if all(
            factorization(math.prod(m.out_split), f) != m.out_split
            or factorization(math.prod(m.in_split), f) != m.in_split
            for f in factors
        ):
            raise ConversionError(
                f"{m.name}: its Kronecker split {m.out_split[0]}x{m.out_split[1]} (out) by "
                f"{m.in_split[0]}x{m.in_split[1]} (in) is not one PEFT's decompose_factor produces"
            )
    raise ConversionError(f"{modules[0].name}: no decompose_factor makes PEFT split every LoKr module as stored")


def _conflict(modules: list[_Kron]) -> str:
    """Why no decompose_both and rank rebuild these modules, naming the ones at odds."""
    off = [m for m in modules if _kron_rank(m, False) is None]
    on = [m for m in modules if _kron_rank(m, True) is None]
    neither = [m for m in off if m in on]
    if neither:
        return (
            f"{neither[0].name}: its factors are factored where PEFT keeps them whole at its rank, or the "
            "reverse, under any decompose_both"
        )
    return f"{off[0].name} needs decompose_both on and {on[0].name} needs it off; PEFT has one setting per adapter"


def lycoris_structure(
    kind: str, units: list[tuple[str, AdapterModule]], kernels: dict[str, tuple[int, ...]]
) -> tuple[dict, dict[str, int]]:
    """The LoHaConfig/LoKrConfig structure switches under which PEFT rebuilds each unit with its
    own shapes, and the `r` each unit needs (`kernels`: each conv's kernel size). Raises
    ConversionError naming a module PEFT cannot rebuild."""
    core = "t1" if kind == "loha" else "t2"
    fields: dict = {"use_effective_conv2d": _effective_conv(units, core)}
    if kind == "lokr":
        factor, decompose_both, ranks = _lokr_settings(units, kernels)
        fields.update(decompose_factor=factor, decompose_both=decompose_both)
        return fields, ranks
    for _, unit in units:
        if unit.shapes["w1b"][0] != unit.shapes["w2b"][0]:
            raise ConversionError(f"{unit.name}: its two Hadamard factors have different ranks; PEFT uses one")
    return fields, {path: unit.rank for path, unit in units}
