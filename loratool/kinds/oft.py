"""LyCORIS's OFT (`diag-oft`): a block-diagonal rotation of the weight's output rows.

Tensors: `oft_blocks` (n, b, b) with n * b output rows, optional `rescale` (out, 1[, 1, ..]) with
`rescaled`, and `alpha`, which is no scale: it is the norm constraint, per output row (the library
clips ||Q|| to alpha * out). Each row block k becomes R_k^T W_k, R_k = (I + Q_k)(I - Q_k)^-1 with
Q = P - P^T (kinds/rotations.py). At strength m every block turns by m R + (1 - m) I (LyCORIS's
multiplier), and the rescale multiplies the result unscaled. BOFT stores `oft_blocks` too, with
one more axis: a module is read as this kind or as BOFT by that shape (`variant`).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import ClassVar

from ..lazy_torch import torch
from .base import ANY, Kind, Shapes, Tensors
from .rotations import lycoris_cayley, rotate_row_blocks

NAMES = {"kohya": {"oft_blocks": "blocks", "rescale": "rescale"}}  # shared with BOFT, told apart by shape


class LycorisRotation(Kind):
    """What LyCORIS's OFT and BOFT share: `oft_blocks` read against the base, `alpha` as the norm
    constraint per output row, an optional `rescale` per row, strength interpolating every
    rotation toward the identity. A subclass gives its block axes (`stage_axes`) and how its
    rotations turn the rows (`turn`)."""

    names: ClassVar[dict[str, dict[str, str]]] = NAMES
    reads_base = True
    negative_strength = False
    has_alpha = False
    alpha_role = "constraint"
    strength_inside = True
    whole_weight = True
    flag_roles: ClassVar[tuple[str, ...]] = ("constraint",)
    stage_axes: ClassVar[int]  # leading axes of oft_blocks before (blocks, size, size): 0 for OFT, 1 for BOFT

    def variant(self, shapes: Shapes) -> str:
        return {3: "oft", 4: "boft"}.get(len(shapes["blocks"]), self.name)

    def missing(self, roles: set[str]) -> list[str]:
        return [] if "blocks" in roles else ["oft_blocks"]

    def check(self, shapes: Shapes) -> str | None:
        blocks = shapes["blocks"]
        if len(blocks) != 3 + self.stage_axes or blocks[-1] != blocks[-2]:
            axes = "(stages, blocks, size, size)" if self.stage_axes else "(blocks, size, size)"
            return f"oft_blocks {list(blocks)} must be {axes}"
        if math.prod(shapes.get("constraint", ())) != 1:
            return f"alpha (the constraint) must hold one value, got shape {list(shapes['constraint'])}"
        rows = blocks[-3] * blocks[-1]
        rescale = shapes.get("rescale")
        if rescale is not None and (rescale[0] != rows or math.prod(rescale) != rows):
            return f"rescale {list(rescale)} must hold one value per output row ({rows})"
        return None

    def rank(self, shapes: Shapes) -> None:
        return None

    def block_size(self, shapes: Shapes) -> int:
        return shapes["blocks"][-1]

    def weight_shape(self, shapes: Shapes) -> tuple[int, ...]:
        blocks = shapes["blocks"]
        return (blocks[-3] * blocks[-1], ANY)

    @abstractmethod
    def turn(self, rows: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """The (out, columns) weight with its rows turned by the rotations (oft_blocks' shape)."""

    def merged(self, tensors: Tensors, weight: torch.Tensor, strength: float) -> torch.Tensor:
        rows = weight.shape[0]
        limit = float(tensors["constraint"].float().reshape(-1)[0]) * rows if "constraint" in tensors else 0.0
        rotations = lycoris_cayley(tensors["blocks"].float(), limit)
        if strength != 1:
            rotations = strength * rotations + (1 - strength) * torch.eye(rotations.shape[-1])
        out = self.turn(weight.reshape(rows, -1), rotations)
        if "rescale" in tensors:
            out = out * tensors["rescale"].float().reshape(-1, 1)
        return out.reshape(weight.shape)

    def delta(self, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            raise ValueError(f"{self.label} rotates the base weight; its update needs the weight")
        return self.merged(tensors, weight, 1.0) - weight


class DiagOFT(LycorisRotation):
    name = "oft"
    label = "OFT"
    stage_axes = 0

    def turn(self, rows: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        return rotate_row_blocks(rows, rotations, transpose=True)
