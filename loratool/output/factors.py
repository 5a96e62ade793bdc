"""What extract and resize share: the rank rule a user gives, and factors stored in a file's dtype.
Each raises the calling command's own error class."""

from __future__ import annotations

from ..errors import LoratoolError
from ..io.safetensors_file import DTYPES
from ..lazy_torch import torch
from ..ops.merge import fits
from ..ops.svd import parse_dynamic
from ..units import Piece


def rank_rule(rank: int | None, dynamic: str | None, error: type[LoratoolError]) -> tuple[str, float] | None:
    """The parsed --dynamic rule (None with a fixed --rank); exactly one of the two must be given."""
    if (rank is None) == (dynamic is None):
        raise error("give exactly one of --rank R and --dynamic METHOD:VALUE")
    if rank is not None and rank < 1:
        raise error(f"--rank {rank}: must be at least 1")
    if dynamic is None:
        return None
    try:
        return parse_dynamic(dynamic)
    except ValueError as exc:
        raise error(f"--dynamic {exc}") from None


def stored_piece(module: str, role: str, tensor: torch.Tensor, dtype: str, error: type[LoratoolError]) -> Piece:
    """A computed factor, checked to fit `dtype` (finite, in range) and cast once, held until written."""
    tensor = tensor.float().cpu()
    if not fits(tensor, DTYPES[dtype]):
        raise error(f"{module}: the {role} factor does not fit {dtype}")
    stored = tensor.to(DTYPES[dtype])
    return Piece(dtype, tuple(stored.shape), None, lambda: stored)
