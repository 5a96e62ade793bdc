"""What extract and resize share: the rank rule a user gives, and factors stored in a file's dtype."""

from __future__ import annotations

import torch

from ..conversion.plan import Piece
from ..errors import ExtractError
from ..io.safetensors_file import DTYPES
from ..ops.merge import fits
from ..ops.svd import parse_dynamic


def rank_rule(rank: int | None, dynamic: str | None) -> tuple[str, float] | None:
    """The parsed --dynamic rule (None with a fixed --rank); exactly one of the two must be given."""
    if (rank is None) == (dynamic is None):
        raise ExtractError("give exactly one of --rank R and --dynamic METHOD:VALUE")
    if rank is not None and rank < 1:
        raise ExtractError(f"--rank {rank}: must be at least 1")
    if dynamic is None:
        return None
    try:
        return parse_dynamic(dynamic)
    except ValueError as exc:
        raise ExtractError(f"--dynamic {exc}") from None


def stored_piece(module: str, role: str, tensor: torch.Tensor, dtype: str) -> Piece:
    """A computed factor, checked to fit `dtype` (finite, in range) and cast once, held until written."""
    tensor = tensor.float().cpu()
    if not fits(tensor, DTYPES[dtype]):
        raise ExtractError(f"{module}: the {role} factor does not fit {dtype}")
    stored = tensor.to(DTYPES[dtype])
    return Piece(dtype, tuple(stored.shape), None, lambda: stored)
