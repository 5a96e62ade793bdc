"""What a converted file will hold, decided before a byte is written.

A unit is one module of the output, the same `AdapterModule` record a reader builds: the canonical
modules it updates, its kind, alpha, and one `Piece` per tensor. A piece either names a source tensor
whose bytes are copied unchanged, or computes a new tensor (row slices, fused factors) when the file
is written, so a conversion holds one module's tensors at a time. Planning reads only the factors of
modules that are split or fused.

The target layout decides which canonical modules it can name; the planner splits fused modules
the layout names part by part (Flux `qkv` for diffusers) and fuses parts the layout names only as a
whole (Flux `to_q/to_k/to_v` for kohya), and refuses, naming the module, whatever cannot be
expressed.
"""

from __future__ import annotations

import math
from dataclasses import replace

from .adapter import Adapter, AdapterModule, Piece
from .archs import BaseArchitecture, FusedSpec
from .errors import ConversionError
from .io.safetensors_file import DTYPE_NAMES, DTYPES
from .kinds import KINDS, dora
from .lazy_torch import torch
from .ops import fuse

# Tensors with one value per output row beside the factors: a fused module's row blocks split them
# like the up factor (lora_B's bias, and DoRA's magnitude per row).
ROW_ROLES = ("bias", dora.ROLE)


class Load:
    """Source tensors for planning and writing; a module's tensors are read when asked for."""

    def __init__(self, adapter: Adapter | None) -> None:
        self.adapter = adapter  # None when every piece is computed (extract)

    def __call__(self, piece: Piece) -> torch.Tensor:
        if piece.transposed:
            stored = Piece(piece.dtype, piece.shape[::-1], piece.key, piece.compute)
            return self(stored).reshape(stored.shape).T
        if piece.compute is not None:
            return piece.compute()
        assert self.adapter is not None, "a keyed piece needs the adapter it came from"
        return self.adapter.load(piece.key).reshape(piece.shape)


def unit_of(module: AdapterModule, load: Load) -> AdapterModule:
    """The module as a unit of output: the same record, with notes of its own. A low-rank product
    stored another way (AdaLoRA's B @ diag(E) @ A) becomes the plain LoRA it equals, its scale
    carried as alpha, since no layout writes those forms."""
    kind = module.kind
    if kind.name == "lora" or not kind.low_rank_product:
        return replace(module, pieces=dict(module.pieces), notes=[])
    roles = [r for r in module.pieces if r not in kind.flag_roles]

    def factor(index: int) -> torch.Tensor:
        tensors = {r: load(module.pieces[r]) for r in roles}
        return kind.low_rank(tensors)[index].contiguous()

    rank = module.kind.rank(module.shapes)
    out_features, in_features = kind.weight_shape(module.shapes)[:2]
    dtype = common_dtype([module.pieces[r].dtype for r in roles])
    pieces = {
        "up": Piece(dtype, (out_features, rank), None, lambda: factor(0)),
        "down": Piece(dtype, (rank, in_features), None, lambda: factor(1)),
    }
    note = f"{module.name}: {kind.label} written as the plain LoRA it equals (rank {rank}, scale {module.scale:.6g})"
    return replace(
        module,
        kind=KINDS["lora"],
        pieces=pieces,
        alpha=module.scale * rank,
        alpha_key=None,
        alpha_dtype=None,
        alpha_source="computed",
        declared_rank=None,
        rslora=False,
        notes=[note],
    )


# -- splitting a fused module into its parts -----------------------------------------------------------
def _part_rows(unit: AdapterModule, group: FusedSpec) -> list[int]:
    """Rows of each target, from the factors' widths; refused when they cannot add up."""
    in_features = unit.pieces["down"].shape[1]
    out_features = unit.pieces["up"].shape[0]
    rows = group.row_sizes(in_features, out_features, unit.targets)
    if sum(rows) != out_features or any(r <= 0 for r in rows):
        raise ConversionError(
            f"{unit.name}: up has {out_features} rows, which do not split into {len(rows)} parts of "
            f"{in_features} input features"
        )
    return rows


def _check_fusable(unit: AdapterModule, action: str) -> None:
    if unit.kind.name != "lora" or "mid" in unit.pieces:
        what = unit.kind.label if unit.kind.name != "lora" else "a LoCon module with a Tucker core"
        raise ConversionError(f"{unit.name}: cannot {action} {what} across a fused weight's row blocks")


def split(arch: BaseArchitecture, unit: AdapterModule, load: Load) -> list[AdapterModule]:
    """One unit per target, with exactly the update the fused module gives that target's rows.

    The first part carries a note saying how the module was split."""
    _check_fusable(unit, "split")
    group = arch.fused_group_of(unit.targets[0])
    rows = _part_rows(unit, group)
    up = load(unit.pieces["up"])
    owners = fuse.column_owners(up, rows)
    if owners is not None and not any(owners):
        owners = None  # an all-zero module: keep it whole rather than dropping every part
    parts: list[AdapterModule] = []
    start = 0
    down_piece, up_piece = unit.pieces["down"], unit.pieces["up"]
    for i, (target, n) in enumerate(zip(unit.targets, rows, strict=True)):
        r0, r1 = start, start + n
        start = r1
        pieces = dict(unit.pieces)
        extra = {
            role: Piece.made(p, (n, *p.shape[1:]), lambda p=p, r0=r0, r1=r1: load(p)[r0:r1])
            for role, p in unit.pieces.items()
            if role in ROW_ROLES
        }
        if owners is not None:
            cols = owners[i]
            if not cols and not extra:
                parts.append(_dropped(unit, target))
                continue
            index = torch.tensor(cols, dtype=torch.long)
            pieces["down"] = Piece.made(
                down_piece, (len(cols), *down_piece.shape[1:]), lambda index=index: load(down_piece)[index]
            )
            pieces["up"] = Piece.made(
                up_piece,
                (n, len(cols), *up_piece.shape[2:]),
                lambda r0=r0, r1=r1, index=index: load(up_piece)[r0:r1][:, index],
            )
            rank = len(cols)
            alpha = _alpha_at_rank(unit, rank)
            alpha_key = None
        else:
            if fuse.is_zero(up[r0:r1]) and not extra:
                parts.append(_dropped(unit, target))
                continue
            pieces["up"] = Piece.made(up_piece, (n, *up_piece.shape[1:]), lambda r0=r0, r1=r1: load(up_piece)[r0:r1])
            alpha, alpha_key = unit.alpha, unit.alpha_key
        pieces.update(extra)
        parts.append(
            replace(
                unit,
                targets=(target,),
                pieces=pieces,
                alpha=alpha,
                alpha_key=alpha_key,
                notes=[],
            )
        )
    how = "block-diagonal up: each part keeps its own columns" if owners is not None else "shared down, rank kept"
    parts[0].notes.insert(0, f"{unit.name}: split into {len(parts)} parts ({how})")
    return parts


def _dropped(unit: AdapterModule, target: str) -> AdapterModule:
    """A part the fused module leaves untouched: nothing to write, but the report says so."""
    return replace(unit, targets=(target,), pieces={}, notes=[f"{target}: zero update in {unit.name}, not written"])


def _alpha_at_rank(unit: AdapterModule, rank: int) -> float:
    return unit.scale * (math.sqrt(rank) if unit.rslora else rank)


# -- fusing parts into the fused module ----------------------------------------------------------------
def fuse_group(group: FusedSpec, parts: dict[str, AdapterModule], load: Load) -> AdapterModule:
    """The fused module from whichever of its parts the adapter has; absent parts get zero rows."""
    for unit in parts.values():
        _check_fusable(unit, "fuse")
    present = [parts.get(t) for t in group.parts]
    first = next(u for u in present if u is not None)
    names = ", ".join(u.name for u in present if u is not None)
    in_features = first.pieces["down"].shape[1]
    rows = []
    for target, size, unit in zip(group.parts, group.sizes, present, strict=True):
        if unit is not None:
            rows.append(unit.pieces["up"].shape[0])
        elif size != "rest":  # "in" or a fraction of it: known from the input width alone
            rows.append(group.row_sizes(in_features, 0, (target,))[0])
        else:
            raise ConversionError(
                f"{names}: cannot fuse into {group.native}: {target} is not in the adapter and its width is unknown"
            )
    problem = dora.fuse_problem([u is not None and dora.ROLE in u.pieces for u in present])
    if problem is not None:
        raise ConversionError(f"{names}: cannot fuse into {group.native}: {problem}")
    units = [u for u in present if u is not None]
    downs = [load(u.pieces["down"]) for u in units]
    shared = (
        all(d.dtype == downs[0].dtype and torch.equal(d, downs[0]) for d in downs)
        and len({(u.scale, u.rslora) for u in units}) == 1
    )
    how = "shared down, rank kept" if shared else "downs concatenated, alpha rescaled to the summed rank"
    notes = [f"{names}: fused into {group.native} ({how})"]
    ups_pieces = [u.pieces["up"] if u is not None else None for u in present]
    up_like = first.pieces["up"]
    pieces: dict[str, Piece] = {}
    if shared:
        up_dtype = common_dtype([u.pieces["up"].dtype for u in units])  # stacking must not round any part
        pieces["down"] = first.pieces["down"]
        pieces["up"] = Piece(
            up_dtype,
            (sum(rows), *up_like.shape[1:]),
            compute=lambda: fuse.stack_rows(
                [None if p is None else load(p).to(DTYPES[up_dtype]) for p in ups_pieces], rows
            ),
        )
        alpha, rslora, alpha_key, alpha_dtype = first.alpha, first.rslora, first.alpha_key, first.alpha_dtype
    else:
        ranks = [0 if u is None else u.pieces["down"].shape[0] for u in present]
        total = sum(ranks)
        scales = [u.scale for u in units]
        same_scale = len(set(scales)) == 1
        down_dtype = common_dtype([u.pieces["down"].dtype for u in units])
        up_dtype = common_dtype([u.pieces["up"].dtype for u in units]) if same_scale else "F32"
        down_pieces = [u.pieces["down"] for u in units]
        pieces["down"] = Piece(
            down_dtype,
            (total, *first.pieces["down"].shape[1:]),
            compute=lambda: torch.cat([load(p).to(DTYPES[down_dtype]) for p in down_pieces]),
        )
        factors = [1.0 if same_scale or u is None else u.scale for u in present]

        def fused_up() -> torch.Tensor:
            ups = [
                None if p is None else (load(p).float() * f if f != 1.0 else load(p)).to(DTYPES[up_dtype])
                for p, f in zip(ups_pieces, factors, strict=True)
            ]
            return fuse.block_diagonal(ups, rows, ranks)

        pieces["up"] = Piece(up_dtype, (sum(rows), total, *up_like.shape[2:]), compute=fused_up)
        rslora = same_scale and first.rslora and all(u.rslora for u in units)
        scale = scales[0] if same_scale else 1.0
        alpha = scale * (math.sqrt(total) if rslora else total)
        alpha_key = alpha_dtype = None
        if not same_scale:
            notes.append("parts had different scales: each up block carries its scale (stored in F32), alpha = rank")
    for role in ROW_ROLES:
        role_pieces = [None if u is None else u.pieces.get(role) for u in present]
        present_pieces = [p for p in role_pieces if p is not None]
        if present_pieces:
            dtype = common_dtype([p.dtype for p in present_pieces])
            pieces[role] = Piece(
                dtype,
                (sum(rows), *present_pieces[0].shape[1:]),
                compute=lambda rp=role_pieces, dtype=dtype: fuse.stack_rows(
                    [None if p is None else load(p).to(DTYPES[dtype]) for p in rp], rows
                ),
            )
    return AdapterModule(
        name=names,
        targets=group.parts,
        component=group.component,
        kind=first.kind,
        pieces=pieces,
        alpha=alpha,
        rslora=rslora,
        alpha_key=alpha_key,
        alpha_dtype=alpha_dtype,
        notes=notes,
    )


def common_dtype(dtypes: list[str]) -> str:
    """The narrowest dtype that holds every one of `dtypes` exactly (stacking must not round any part)."""
    result = DTYPES[dtypes[0]]
    for d in dtypes[1:]:
        result = torch.promote_types(result, DTYPES[d])
    return DTYPE_NAMES[result]
