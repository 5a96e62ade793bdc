"""combine: several LoRAs of one model into one LoRA file, exactly or at a chosen rank.

Every LoRA is planned in the target layout first (the same units convert writes), so modules line
up by their output name whatever layout each input used. A module in several LoRAs becomes

    up = [s_1 sqrt|c_1| up_1, s_2 sqrt|c_2| up_2, ...],  down = [sqrt|c_1| down_1; sqrt|c_2| down_2; ...]

with c_i = weight_i * scale_i (s_i its sign) and alpha = the summed rank: up @ down is exactly
sum_i c_i up_i @ down_i. kohya's sum of factors (sum of ups times sum of downs) would add cross
terms (sd-scripts issue 586). With `rank`, each module's sum is cut to its best rank-R
approximation through QR of the stacked factors and an SVD of the small core, never a dense SVD.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..adapter import Adapter, AdapterModule, Piece
from ..errors import ConversionError
from ..formats import LAYOUTS, read_adapter
from ..io.destination import check_destination
from ..io.safetensors_file import DTYPES
from ..kinds import KINDS
from ..lazy_torch import torch
from ..ops.lowrank import best_rank
from ..output.planning import plan_units, refuse_lossy_input
from ..output.write import config_json, write_output
from ..progress import Progress
from ..strengths import lora_weights
from ..units import Load, common_dtype

COMBINED_KEY = "loratool.combined_from"


@dataclass
class CombineReport:
    sources: list[str]
    weights: list[float]
    dest: str
    target: str
    architecture: str | None
    modules_out: int
    modules_shared: int  # modules more than one LoRA updates
    rank: int | None  # the requested rank, None for the exact concatenation
    bytes_written: int
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Part:
    unit: AdapterModule
    load: Load
    weight: float
    first: bool  # from the first LoRA, whose source the writer copies bytes from


def combine(
    loras: Sequence[str | os.PathLike],
    dest: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    to: str | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
) -> CombineReport:
    """Write one LoRA whose update is the weighted sum of the inputs' updates.

    Exact without `rank` (alpha rescaled to the summed rank); with `rank`, each module's sum cut
    to its best rank-`rank` approximation. `to` is the layout (default: the first LoRA's).
    """
    strengths = lora_weights(loras, weights, ConversionError, "combine")
    if rank is not None and rank < 1:
        raise ConversionError(f"--rank {rank}: must be at least 1")
    adapters: list[Adapter] = []
    try:
        for path in loras:
            adapter, detection = read_adapter(path, allow_pickle=allow_pickle)
            adapters.append(adapter)
            refuse_lossy_input(adapter, detection)
            _refuse_uncombinable(adapter)
        layout = LAYOUTS[to or adapters[0].native_layout]
        check_destination([Path(p) for p in loras], Path(dest), force, directory=layout.is_directory)
        arch = _common_arch(adapters)
        named_parts: dict[str, list[_Part]] = {}
        notes: list[str] = []
        for i, (adapter, strength) in enumerate(zip(adapters, strengths, strict=True)):
            named, unit_notes = plan_units(adapter, layout)
            notes += unit_notes
            load = Load(adapter)
            for name, unit in named.items():
                named_parts.setdefault(name, []).append(_Part(unit, load, strength, i == 0))
        combined = {name: _combined(name, parts, rank) for name, parts in named_parts.items()}
        first = adapters[0]
        entries = [e for name, unit in combined.items() for e in layout.entries(name, unit, arch)]
        metadata = layout.metadata(combined, first, arch)
        # File names only: where the author keeps them is nobody else's business (and not reproducible).
        record = {"loras": [Path(p).name for p in loras], "weights": strengths, "rank": rank}
        metadata[COMBINED_KEY] = config_json(record).strip()
        written = write_output(layout, dest, force, first, entries, metadata, combined, first, arch, progress)
    finally:
        for adapter in adapters:
            adapter.close()
    return CombineReport(
        sources=[str(p) for p in loras],
        weights=strengths,
        dest=str(dest),
        target=layout.name,
        architecture=getattr(arch, "name", None),
        modules_out=len(combined),
        modules_shared=sum(1 for parts in named_parts.values() if len(parts) > 1),
        rank=rank,
        bytes_written=written,
        notes=notes,
    )


def _refuse_uncombinable(adapter: Adapter) -> None:
    for key in adapter.tokens:
        raise ConversionError(
            f"{key}: a textual-inversion token embedding; combining LoRAs cannot merge tokens "
            "(convert each file --to kohya to keep its tokens)"
        )
    for module in adapter.modules.values():
        if not module.kind.low_rank_product:
            raise ConversionError(
                f"{module.name}: combine stacks LoRA factors, and {module.kind.label} updates do not add up to "
                f"one {module.kind.label} module; merge it into the base instead"
            )
        if module.dora_key is not None:
            raise ConversionError(
                f"{module.name}: DoRA rescales by the merged weight's norm, so its updates do not add; "
                "merge it into the base instead"
            )


def _common_arch(adapters: list[Adapter]):
    names = {getattr(a.arch, "name", None) for a in adapters}
    if len(names) > 1:
        listed = ", ".join(f"{a.source.path} ({getattr(a.arch, 'name', 'unknown')})" for a in adapters)
        raise ConversionError(f"LoRAs of different models cannot be combined: {listed}")
    return adapters[0].arch


def _combined(name: str, parts: list[_Part], rank: int | None) -> AdapterModule:
    head = parts[0]
    if len(parts) == 1 and head.weight == 1.0 and (rank is None or (head.unit.rank or 0) <= rank):
        unit = head.unit
        return unit if head.first else _detached(unit, head.load)
    want = _flat_shape(head.unit)
    for part in parts[1:]:
        if part.unit.transposed != head.unit.transposed or part.unit.embedding != head.unit.embedding:
            raise ConversionError(f"{name}: the LoRAs adapt it in different ways (embedding / fan_in_fan_out)")
        if _flat_shape(part.unit) != want:
            raise ConversionError(
                f"{name}: {part.unit.name} updates a {list(_flat_shape(part.unit))} weight but "
                f"{head.unit.name} a {list(want)} one; are they LoRAs of the same model?"
            )
    total = sum(p.unit.rank or 0 for p in parts)
    out_rank = total if rank is None else min(rank, total)
    up_shape, down_shape = head.unit.factor_shapes(out_rank)
    cut = out_rank < total
    # An exact sum is stored in float32: scaling fp16/bf16 factors by sqrt|c| would round them.
    # A rank cut is an approximation anyway and keeps the inputs' precision.
    floor = [] if cut else ["F32"]
    up_dtype = common_dtype([*(p.unit.pieces["up"].dtype for p in parts), *floor])
    down_dtype = common_dtype([*(p.unit.pieces["down"].dtype for p in parts), *floor])
    cached: dict[str, torch.Tensor] = {}

    def factors() -> dict[str, torch.Tensor]:
        """Computed once per module when its first tensor is written, dropped after the last."""
        if not cached:
            ups, downs = zip(*(_scaled_factors(p) for p in parts), strict=True)
            up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
            if cut:
                up, down = best_rank(up, down, out_rank)
            cached["up"] = up.reshape(up_shape).to(DTYPES[up_dtype])
            cached["down"] = down.reshape(down_shape).to(DTYPES[down_dtype])
            biases = [
                p.weight * p.unit.scale * p.load(p.unit.pieces["bias"]).float()
                for p in parts
                if "bias" in p.unit.pieces
            ]
            if biases:
                cached["bias"] = torch.stack(biases).sum(0).to(DTYPES[up_dtype])
        return cached

    roles = ["up", "down"] + (["bias"] if any("bias" in p.unit.pieces for p in parts) else [])
    untaken: set[str] = set()

    def take(role: str) -> torch.Tensor:
        """Each role is written once; after the module's last one its tensors are dropped."""
        if not untaken:
            untaken.update(roles)
        tensor = factors()[role]
        untaken.discard(role)
        if not untaken:
            cached.clear()
        return tensor

    pieces = {
        "up": Piece(up_dtype, up_shape, None, lambda: take("up")),
        "down": Piece(down_dtype, down_shape, None, lambda: take("down")),
    }
    if "bias" in roles:
        pieces["bias"] = Piece(up_dtype, (up_shape[0],), None, lambda: take("bias"))
    sources = " + ".join(f"{p.weight:g} x {p.unit.name}" for p in parts)
    return replace(
        head.unit,
        kind=KINDS["lora"],
        pieces=pieces,
        alpha=float(out_rank),
        rslora=False,
        declared_rank=out_rank,
        alpha_key=None,
        alpha_dtype=None,
        name=sources,
        notes=[],
    )


def _detached(unit: AdapterModule, load: Load) -> AdapterModule:
    """A unit of a later LoRA, read through its own source (the writer copies only from the first)."""
    pieces = {
        role: Piece(p.dtype, p.shape, None, lambda p=p: load(p)) if p.key is not None else p
        for role, p in unit.pieces.items()
    }
    return replace(unit, pieces=pieces, alpha_key=None)


def _scaled_factors(part: _Part) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) flattened to 2-D in fp32, with weight * scale split evenly between them."""
    tensors = {role: part.load(p) for role, p in part.unit.pieces.items() if role in ("up", "down", "mid")}
    up, down = part.unit.kind.low_rank(tensors)
    c = part.weight * part.unit.scale
    root = math.sqrt(abs(c))
    return up * math.copysign(root, c), down * root


def _flat_shape(unit: AdapterModule) -> tuple[int, int]:
    """The update as a matrix: (out, in * kh * kw), whatever the factors' conv or linear form."""
    shape = unit.kind.weight_shape(unit.shapes)
    return shape[0], math.prod(shape[1:])
