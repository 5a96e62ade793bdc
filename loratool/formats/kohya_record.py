"""sd-scripts' training record in a kohya file's metadata (`ss_network_dim`, `ss_network_alpha`,
the LoCon `conv_dim`/`conv_alpha` in `ss_network_args`), kept true to the modules a command writes:
convert and combine carry it, resize recomputes it after the cut, extract writes it new."""

from __future__ import annotations

import json

from ..adapter import AdapterModule
from ..kinds.base import has_kernel


def network_dim_alpha(metadata: dict[str, str], units: dict[str, AdapterModule]) -> dict[str, str]:
    """`ss_network_dim` and `ss_network_alpha`, where present, recomputed from the modules as written."""
    out = dict(metadata)
    if "ss_network_dim" in out:
        out["ss_network_dim"] = _one_or_dynamic([u.rank for u in units.values()])
    if "ss_network_alpha" in out:
        out["ss_network_alpha"] = _one_or_dynamic([u.alpha_for(False) for u in units.values()])
    return out


def locon_record(units: dict[str, AdapterModule]) -> dict[str, str] | None:
    """`conv_dim` and `conv_alpha` when one rank and one alpha hold for every kxk conv, else None."""
    convs = [u for u in units.values() if has_kernel(u.pieces["down"].shape)]
    ranks, alphas = {u.rank for u in convs}, {u.alpha_for(False) for u in convs}
    if len(ranks) == 1 and len(alphas) == 1:
        return {"conv_dim": str(ranks.pop()), "conv_alpha": f"{alphas.pop():g}"}
    return None


def updated_network_args(metadata: dict[str, str], units: dict[str, AdapterModule]) -> None:
    """After a cut, the LoCon record follows the new ranks, or is dropped when no one rank holds."""
    try:
        args = json.loads(metadata.get("ss_network_args", ""))
    except json.JSONDecodeError:
        return
    if not isinstance(args, dict) or "conv_dim" not in args:
        return
    record = locon_record(units)
    if record is not None:
        args.update(record)
    else:
        args.pop("conv_dim", None)
        args.pop("conv_alpha", None)
    metadata["ss_network_args"] = json.dumps(args)


def _one_or_dynamic(values: list[float | int | None]) -> str:
    distinct = {v for v in values if v is not None}
    if len(distinct) != 1:
        return "Dynamic"
    value = distinct.pop()
    return str(int(value)) if float(value).is_integer() else repr(float(value))
