"""LyCORIS's OFT (`diag-oft`): a block-diagonal rotation of the weight's output rows.

Tensors: `oft_blocks` (n, b, b) with n * b output rows, optional `rescale` (out, 1[, 1, ..]) with
`rescaled`, and `alpha`, which is no scale: it is the norm constraint, per output row (the library
clips ||Q|| to alpha * out). Each row block k becomes R_k^T W_k, R_k = (I + Q_k)(I - Q_k)^-1 with
Q = P - P^T (kinds/rotations.py). At strength m every block turns by m R + (1 - m) I (LyCORIS's
multiplier), and the rescale multiplies the result unscaled. BOFT stores `oft_blocks` too, with
one more axis: a module is read as this kind or as BOFT by that shape (`by_shape`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from .base import ANY, Kind, Shapes, Tensors
from .rotations import lycoris_cayley, rotate_row_blocks

NAMES = {"kohya": {"oft_blocks": "blocks", "rescale": "rescale"}}  # shared with BOFT, told apart by shape


def constraint_of(tensors: Tensors, rows: int) -> float:
    """LyCORIS keeps alpha per output row; the clip applies to alpha * rows (0: none)."""
    alpha = tensors.get("constraint")
    return 0.0 if alpha is None else float(alpha.float().reshape(-1)[0]) * rows


def rescale_problem(shapes: Shapes, rows: int) -> str | None:
    rescale = shapes.get("rescale")
    if rescale is not None and (rescale[0] != rows or math.prod(rescale) != rows):
        return f"rescale {list(rescale)} must hold one value per output row ({rows})"
    return None


class DiagOFT(Kind):
    name = "oft"
    label = "OFT"
    names: ClassVar[dict[str, dict[str, str]]] = NAMES
    reads_base = True
    negative_strength = False
    has_alpha = False
    alpha_role = "constraint"
    strength_inside = True
    whole_weight = True
    flag_roles: ClassVar[tuple[str, ...]] = ("constraint",)

    def variant(self, shapes: Shapes) -> str:
        return "boft" if len(shapes["blocks"]) == 4 else self.name  # BOFT: the same names, one more axis

    def missing(self, roles: set[str]) -> list[str]:
        return [] if "blocks" in roles else ["oft_blocks"]

    def check(self, shapes: Shapes) -> str | None:
        blocks = shapes["blocks"]
        if len(blocks) != 3 or blocks[1] != blocks[2]:
            return f"oft_blocks {list(blocks)} must be (blocks, size, size)"
        if math.prod(shapes.get("constraint", ())) != 1:
            return f"alpha (the constraint) must hold one value, got shape {list(shapes['constraint'])}"
        return rescale_problem(shapes, blocks[0] * blocks[1])

    def rank(self, shapes: Shapes) -> None:
        return None

    def block_size(self, shapes: Shapes) -> int:
        return shapes["blocks"][-1]

    def weight_shape(self, shapes: Shapes) -> tuple[int, ...]:
        blocks = shapes["blocks"]
        return (blocks[0] * blocks[1], ANY)

    def merged(self, tensors: Tensors, weight: torch.Tensor, strength: float) -> torch.Tensor:
        rows = weight.shape[0]
        rotations = lycoris_cayley(tensors["blocks"].float(), constraint_of(tensors, rows))
        if strength != 1:
            eye = torch.eye(rotations.shape[-1])
            rotations = strength * rotations + (1 - strength) * eye
        out = rotate_row_blocks(weight.reshape(rows, -1), rotations, transpose=True)
        if "rescale" in tensors:
            out = out * tensors["rescale"].float().reshape(-1, 1)
        return out.reshape(weight.shape)

    def delta(self, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            raise ValueError("OFT rotates the base weight; its update needs the weight")
        return self.merged(tensors, weight, 1.0) - weight
