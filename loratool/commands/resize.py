"""resize: a LoRA cut to a lower rank, module by module, without ever forming its dense update.

With up = Qb Rb and down^T = Qa Ra, up @ down = Qb (Rb Ra^T) Qa^T: the r x r core's SVD gives
every singular value of the update exactly, so the truncation is the optimal one (Eckart-Young)
in O((out + in) r^2), and a dynamic rule sees the whole spectrum. The module's scale (alpha/r, or
alpha/sqrt(r) for rsLoRA) is kept, so the file behaves the same at the same strength; alpha
follows the new rank. A module already at or below the new rank is copied unchanged.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..adapter import Adapter, AdapterModule
from ..errors import ResizeError
from ..formats import LAYOUTS, Layout, read_adapter
from ..formats.kohya_record import updated_network_args
from ..io.destination import check_destination
from ..io.safetensors_file import dtype_size
from ..lazy_torch import torch
from ..ops.device import resolve_device
from ..ops.lowrank import core_svd
from ..ops.svd import dynamic_rank
from ..output.factors import rank_rule, stored_piece
from ..output.planning import extra_entries, ignored_notes, plan_units, refuse_lossy_input
from ..output.write import config_json, write_output
from ..progress import Progress, Tally
from ..units import Load, unit_of

RESIZED_KEY = "loratool.resized_from"


@dataclass
class ResizedModule:
    name: str
    rank_in: int
    rank_out: int
    retained: float  # share of ||dW||_F^2 kept
    relative_error: float  # ||dW - dW_r||_F / ||dW||_F


@dataclass
class ResizeReport:
    source: str
    dest: str
    target: str
    method: str
    modules: list[ResizedModule]
    bytes_written: int
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        data = dict(self.__dict__)
        data["modules"] = [dict(m.__dict__) for m in self.modules]
        return data


def resize(
    lora: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    rank: int | None = None,
    dynamic: str | None = None,
    device: str = "auto",
    force: bool = False,
    allow_pickle: bool = False,
    progress: Progress | None = None,
) -> ResizeReport:
    """Write `lora` at a lower rank: `rank`, or per module by a `dynamic` rule ("fro:0.9",
    "ratio:20", "cumulative:0.9", "eps:1e-3"; never above the module's own rank). Same layout."""
    rule = rank_rule(rank, dynamic, ResizeError)
    torch_device = resolve_device(device)
    adapter, detection = read_adapter(lora, allow_pickle=allow_pickle)
    with adapter:
        refuse_lossy_input(adapter, detection)
        layout = LAYOUTS[adapter.native_layout]
        check_destination([Path(lora)], Path(dest), force, directory=layout.is_directory)
        for module in adapter.modules.values():
            if not module.kind.low_rank_product:
                raise ResizeError(
                    f"{module.name}: resize works on LoRA and LoCon modules; {module.kind.label} has no rank to cut"
                )
            if module.dora_key is not None:
                raise ResizeError(
                    f"{module.name}: DoRA's magnitude was trained for this exact direction; a lower rank changes it"
                )
        named, notes = _units(adapter, layout)
        notes += ignored_notes(adapter)
        load = Load(adapter)
        results = []
        resized: dict[str, AdapterModule] = {}
        unit_bytes = {name: _unit_bytes(unit) for name, unit in named.items()}
        tally = Tally(progress, len(named), sum(unit_bytes.values()), unit="modules")
        for name, unit in named.items():
            resized[name], result = _resize_unit(name, unit, load, rank, rule, torch_device)
            results.append(result)
            tally.advance(unit_bytes[name])
        entries = [e for name, unit in resized.items() for e in layout.entries(name, unit, adapter.arch)]
        entries += extra_entries(adapter, layout)  # PEFT's saved full weights (modules_to_save) go along
        metadata = layout.metadata(resized, adapter, adapter.arch)
        updated_network_args(metadata, resized)
        method = f"rank {rank}" if rank is not None else str(dynamic)
        metadata[RESIZED_KEY] = config_json({"source": Path(lora).name, "method": method}).strip()
        written = write_output(layout, dest, force, adapter, entries, metadata, resized, adapter, adapter.arch, None)
    return ResizeReport(str(lora), str(dest), layout.name, method, results, written, notes)


def _unit_bytes(unit: AdapterModule) -> int:
    return sum(math.prod(p.shape) * dtype_size(p.dtype) for p in unit.pieces.values())


def _resize_unit(
    name: str,
    unit: AdapterModule,
    load: Load,
    rank: int | None,
    rule: tuple[str, float] | None,
    device: torch.device,
) -> tuple[AdapterModule, ResizedModule]:
    tensors = {role: load(p).to(device) for role, p in unit.pieces.items() if role in ("up", "down", "mid")}
    up, down = unit.kind.low_rank(tensors)
    core = core_svd(up, down)
    r = unit.rank or core.s.numel()
    spectrum = core.s * abs(unit.scale)  # the singular values of the update the file applies
    energy = float(spectrum.square().sum())
    new_rank = rank if rule is None else dynamic_rank(spectrum, rule[0], rule[1], energy)
    new_rank = min(new_rank, r, core.s.numel())  # never above the rank the update can have
    kept = float(spectrum[:new_rank].square().sum())
    retained = 1.0 if energy == 0 else min(kept / energy, 1.0)
    result = ResizedModule(name, r, new_rank, retained, math.sqrt(max(1.0 - retained, 0.0)))
    if new_rank >= r:
        return unit, result
    new_up, new_down = core.factors(new_rank)
    up_shape, down_shape = unit.factor_shapes(new_rank)
    pieces = {
        "up": stored_piece(name, "up", new_up.reshape(up_shape), unit.pieces["up"].dtype, ResizeError),
        "down": stored_piece(name, "down", new_down.reshape(down_shape), unit.pieces["down"].dtype, ResizeError),
    }
    if "bias" in unit.pieces:  # lora_B.bias is not part of the low-rank product
        pieces["bias"] = unit.pieces["bias"]
    scale = unit.scale
    alpha = scale * (math.sqrt(new_rank) if unit.rslora else new_rank)
    return replace(unit, pieces=pieces, alpha=alpha, declared_rank=None, alpha_key=None, alpha_dtype=None), result


def _units(adapter: Adapter, layout: Layout) -> tuple[dict[str, AdapterModule], list[str]]:
    """The output units by name. A kohya file of a model we have no table for (Wan, SD3, ...)
    keeps its own names: resizing renames nothing, so it needs no architecture."""
    if adapter.arch is None and layout.name == "kohya" and adapter.format == "kohya":
        load = Load(adapter)
        return {name: unit_of(module, load) for name, module in adapter.modules.items()}, []
    if adapter.arch is None:
        raise ResizeError(
            f"{adapter.source.path}: unknown architecture ({adapter.arch_reason}); resize keeps names as they are "
            "only for kohya files"
        )
    return plan_units(adapter, layout)
