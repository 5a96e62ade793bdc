"""PEFT's IA3: one learned vector `ia3_l` that multiplies the weight along one axis.

W' = W * l: per output row for most modules (`ia3_l` stored (out, 1)), per input column for the
config's `feedforward_modules` (stored (1, in)). Unlike LyCORIS's IA3 (W * (1 + w), kinds/ia3.py)
the vector is the factor itself, so the update is W * (l - 1), and a merge at strength s gives
W * (1 + s (l - 1)): PEFT's own merge at 1, the base at 0. No rank, no alpha.

LyCORIS's IA3 holds the same update as w = l - 1, per output row or (`on_input`) per input column,
at every strength, so convert writes one as the other (`as_lycoris`, `from_lycoris`).
"""

from __future__ import annotations

from typing import ClassVar

from ..lazy_torch import torch
from .base import ANY, Kind, Shapes, Tensors


class PeftIA3(Kind):
    name = "ia3-peft"
    label = "IA3 (PEFT)"
    names: ClassVar[dict[str, dict[str, str]]] = {"peft": {"ia3_l": "vector"}}
    reads_base = True
    stores_alpha = False

    def missing(self, roles: set[str]) -> list[str]:
        return [] if "vector" in roles else ["ia3_l"]

    def check(self, shapes: Shapes) -> str | None:
        vector = shapes["vector"]
        if len(vector) != 2 or 1 not in vector:
            return f"ia3_l {list(vector)} must be (out, 1) or (1, in): PEFT's IA3 of a linear layer"
        return None

    def rank(self, shapes: Shapes) -> None:
        return None

    def weight_shape(self, shapes: Shapes) -> tuple[int, ...]:
        rows, cols = shapes["vector"]
        return (rows, ANY) if cols == 1 else (ANY, cols)

    def output_rows(self, tensors: Tensors) -> set[str]:
        return {"vector"} if tensors["vector"].shape[1] == 1 else set()

    def delta(self, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            raise ValueError("IA3 multiplies the base weight; its update needs the weight")
        vector = tensors["vector"].float()
        return weight * (vector.reshape(-1, 1) - 1 if vector.shape[1] == 1 else vector.reshape(1, -1) - 1)


def as_lycoris(vector: torch.Tensor) -> tuple[str, torch.Tensor]:
    """PEFT's `ia3_l` as LyCORIS's IA3: (the axis it scales, w = l - 1 as a vector)."""
    axis = "out" if vector.shape[-1] == 1 else "in"
    return axis, vector.float().reshape(-1) - 1


def from_lycoris(axis: str, vector: torch.Tensor) -> torch.Tensor:
    """LyCORIS's IA3 vector w as PEFT's `ia3_l` = 1 + w, (out, 1) per row or (1, in) per column."""
    factor = 1 + vector.float().reshape(-1)
    return factor.reshape(-1, 1) if axis == "out" else factor.reshape(1, -1)
