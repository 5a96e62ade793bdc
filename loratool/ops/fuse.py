"""Row-block surgery on low-rank factors: splitting a fused module into its parts and fusing parts.

A fused weight (Flux `qkv`/`linear1`, OpenCLIP `in_proj`) stacks its parts' rows. A LoRA on it
has one down and one up; a LoRA on the parts has one pair per part. Both directions are exact:

- split, shared down: every part keeps the whole down and its rows of up (rank kept).
- split, block-diagonal up: when no rank column feeds two parts, each part takes only its own
  columns (the original per-part modules come back, with their own ranks).
- fuse, shared down: parts with identical downs and scales stack their ups (rank kept).
- fuse, concatenated: downs stacked, ups placed block-diagonally; the rank is the sum, so the
  caller rescales alpha to keep the update.
"""

from __future__ import annotations

from ..lazy_torch import torch


def column_owners(up: torch.Tensor, row_sizes: list[int]) -> list[list[int]] | None:
    """Per row block, the rank columns it uses, when no column is used by two blocks; else None.

    Columns no block uses are left out: they carry no update.
    """
    up = up.flatten(1)
    if sum(row_sizes) != up.shape[0]:
        raise ValueError(f"row blocks {row_sizes} do not add up to {up.shape[0]} rows")
    # A trained fused up is dense: its first column already feeds several blocks. Checking that
    # one column first keeps the full scan for the rare block-diagonal file.
    first = [bool(b.any()) for b in torch.split(up[:, 0], row_sizes)]
    if sum(first) > 1:
        return None
    used = []
    start = 0
    for rows in row_sizes:
        used.append(up[start : start + rows].ne(0).any(dim=0))
        start += rows
    if bool((torch.stack(used).sum(dim=0) > 1).any()):
        return None
    return [torch.nonzero(u).flatten().tolist() for u in used]


def is_zero(t: torch.Tensor) -> bool:
    """Whether every element is zero; a dense tensor answers from its first column."""
    flat = t.flatten(1) if t.dim() > 1 else t.reshape(-1, 1)
    return not bool(flat[:, 0].any()) and not bool(flat.any())


def block_diagonal(ups: list[torch.Tensor], row_sizes: list[int], ranks: list[int]) -> torch.Tensor:
    """Place each part's up (rows_i x rank_i; None for an absent part) on the diagonal."""
    ref = next(u for u in ups if u is not None)
    out = torch.zeros((sum(row_sizes), sum(ranks), *ref.shape[2:]), dtype=ref.dtype)
    r0 = c0 = 0
    for up, rows, rank in zip(ups, row_sizes, ranks, strict=True):
        if up is not None:
            out[r0 : r0 + rows, c0 : c0 + rank] = up
        r0 += rows
        c0 += rank
    return out


def stack_rows(blocks: list[torch.Tensor | None], row_sizes: list[int]) -> torch.Tensor:
    """Stack row blocks, zeros for absent ones (a part the adapter does not touch)."""
    like = next(b for b in blocks if b is not None)
    filled = [
        b if b is not None else torch.zeros((rows, *like.shape[1:]), dtype=like.dtype)
        for b, rows in zip(blocks, row_sizes, strict=True)
    ]
    return torch.cat(filled, dim=0)


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """Flux's final modulation: single-file rows are (shift, scale), diffusers' are (scale, shift)."""
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]], dim=0)


# -- row order ------------------------------------------------------------------------------------------
# Names, base tensors and factors are each in single-file ("native") row order or in the canonical
# (diffusers) one. The two differ only for modules whose architecture says so (`swaps_rows`: Flux's
# final modulation); these two functions are the one rule every command applies between them.
def halves_differ(swaps_rows: bool, native: bool, other_native: bool) -> bool:
    """Whether rows in one order must have their halves swapped to be in the other."""
    return swaps_rows and native != other_native


def reorder_rows(t: torch.Tensor, swaps_rows: bool, from_native: bool, to_native: bool) -> torch.Tensor:
    """A tensor indexed by the module's output rows, moved from one row order to the other."""
    return swap_halves(t) if halves_differ(swaps_rows, from_native, to_native) else t
